//! The `ids` command line's own parts: numbers ([`numbers`]), renderings
//! ([`render`]), streaming reads ([`read`]), exit codes and error reports
//! ([`errors`]), output sinks ([`output`]), `ids dump` ([`dump`]).

pub mod dump;
pub mod errors;
pub mod numbers;
pub mod output;
pub mod read;
pub mod render;
