//! The round trip against scripted "agents": answers after missed SMIs,
//! silence, rejection, and the readiness gate.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use host_injector::{Injector, MailboxFile, SmiBackend, SmiError, TransactError};
use smmvmi_mailbox::layout::{self, AgentState, ServeStatus};
use smmvmi_mailbox::shared::SharedMemory;
use smmvmi_mailbox::wire::{Direction, FrameHeader};
use smmvmi_testkit::MailboxBuilder;
use smmvmi_testkit::mailbox::MAILBOX_SIZE;

fn mailbox(name: &str, ready: bool) -> PathBuf {
    let p = std::env::temp_dir().join(format!("hi-tx-{name}-{}", std::process::id()));
    let b = if ready {
        MailboxBuilder::ready()
    } else {
        MailboxBuilder::new(MAILBOX_SIZE).state(AgentState::Booting)
    };
    b.write_file(&p).unwrap();
    p
}

/// Answers (status, fixed reply) on the `answer_on`-th SMI; counts SMIs.
struct Scripted {
    path: PathBuf,
    answer_on: u32,
    status: ServeStatus,
    raised: Arc<AtomicU32>,
}

impl SmiBackend for Scripted {
    fn raise(&mut self) -> Result<(), SmiError> {
        let n = self.raised.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.answer_on {
            let mb = MailboxFile::open(&self.path).unwrap();
            let bell = mb.load_u64(layout::OFF_REQ_DOORBELL).unwrap();
            mb.copy_in(mb.areas().reply.start, b"sealed-reply").unwrap();
            mb.store_u32(layout::OFF_SERVE_STATUS, self.status as u32)
                .unwrap();
            mb.store_u32(layout::OFF_REPLY_LEN, 12).unwrap();
            mb.store_u64(layout::OFF_SERVE_CYCLES, 1234).unwrap();
            mb.store_u64(layout::OFF_REPLY_DONE, bell).unwrap();
        }
        Ok(())
    }
    fn name(&self) -> &'static str {
        "scripted"
    }
}

fn frame(seq: u64) -> Vec<u8> {
    let mut f = FrameHeader {
        direction: Direction::Request,
        body_len: 8,
        seq,
        in_reply_to: 0,
        flags: 0,
        client: 0,
    }
    .encode()
    .to_vec();
    f.extend_from_slice(&[0u8; 24]);
    f
}

fn injector(path: &PathBuf, answer_on: u32, status: ServeStatus) -> (Injector, Arc<AtomicU32>) {
    let raised = Arc::new(AtomicU32::new(0));
    let smi = Scripted {
        path: path.clone(),
        answer_on,
        status,
        raised: raised.clone(),
    };
    let inj = Injector::new(MailboxFile::open(path).unwrap(), Box::new(smi))
        .reraise(Duration::from_millis(5));
    (inj, raised)
}

#[test]
fn re_raises_until_the_agent_answers() {
    let p = mailbox("reraise", true);
    let (mut inj, raised) = injector(&p, 4, ServeStatus::Ok);
    let t = inj.transact(&frame(77), Duration::from_secs(5)).unwrap();
    assert_eq!(t.reply, b"sealed-reply");
    assert_eq!(t.smis, 4);
    assert_eq!(raised.load(Ordering::SeqCst), 4);
    assert_eq!(t.serve_cycles, 1234);
    let mb = MailboxFile::open(&p).unwrap();
    assert_eq!(mb.load_u64(layout::OFF_REQ_DOORBELL).unwrap(), 77);
    std::fs::remove_file(p).unwrap();
}

#[test]
fn a_silent_agent_is_an_alert_at_the_deadline() {
    let p = mailbox("silent", true);
    let (mut inj, raised) = injector(&p, u32::MAX, ServeStatus::Ok);
    let start = Instant::now();
    let e = inj
        .transact(&frame(5), Duration::from_millis(150))
        .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, TransactError::Silent { .. }), "{e}");
    assert!(e.to_string().starts_with("ALERT"), "{e}");
    assert!(
        took < Duration::from_millis(400),
        "deadline overrun: {took:?}"
    );
    assert!(
        raised.load(Ordering::SeqCst) >= 10,
        "SMIs must be re-raised"
    );
    std::fs::remove_file(p).unwrap();
}

#[test]
fn a_rejection_is_reported_with_its_status() {
    let p = mailbox("reject", true);
    let (mut inj, _) = injector(&p, 1, ServeStatus::BadTag);
    let e = inj.transact(&frame(6), Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(
            e,
            TransactError::Rejected {
                status: Some(ServeStatus::BadTag),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("key"), "{e}");
    std::fs::remove_file(p).unwrap();
}

#[test]
fn no_smi_before_the_agent_is_ready() {
    let p = mailbox("notready", false);
    let (mut inj, raised) = injector(&p, 1, ServeStatus::Ok);
    let e = inj.transact(&frame(7), Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, TransactError::NotReady { .. }), "{e}");
    assert!(e.to_string().contains("QEMU 7.2"), "{e}");
    assert_eq!(raised.load(Ordering::SeqCst), 0, "no SMI may be raised");
    let mb = MailboxFile::open(&p).unwrap();
    assert_eq!(mb.load_u64(layout::OFF_REQ_DOORBELL).unwrap(), 0);
    std::fs::remove_file(p).unwrap();
}
