//! The `ids` command line's own parts: numbers ([`numbers`]), renderings
//! ([`render`]), streaming reads ([`read`]), exit codes and error reports
//! ([`errors`]), output sinks ([`output`]), `ids dump` ([`dump`]), `ids mount` ([`mount`]).

pub mod dump;
pub mod errors;
pub mod mount;
pub mod numbers;
pub mod output;
pub mod read;
pub mod render;
