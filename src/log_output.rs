//! Where log lines go: stderr (journald under systemd), through a thread of
//! their own over a bounded queue. A reader that stops reading (a full
//! pipe) or goes away (a closed one: a log shipper that died, `| head -n 1`)
//! costs the daemon log lines, counted as background failures of task
//! `log_output`, never a blocked task, a panic, or a SIGTERM it cannot act
//! on. (Writing to stderr directly would block every task behind a full
//! pipe, and tracing-subscriber reports a failed write with `eprintln!`,
//! which panics on a closed one.)

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Lines waiting at most: beyond, a line is dropped (and counted).
const QUEUE: usize = 4096;

/// The queue and how many lines it holds not yet written.
struct Sink {
    tx: SyncSender<Vec<u8>>,
    pending: Arc<AtomicUsize>,
}

static SINK: OnceLock<Option<Sink>> = OnceLock::new();

/// The writer thread, started on first use; `None` when no thread could be
/// started (then lines go to stderr directly, errors ignored).
fn sink() -> Option<&'static Sink> {
    SINK.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let pending = Arc::new(AtomicUsize::new(0));
        let written = pending.clone();
        std::thread::Builder::new()
            .name("log-output".into())
            .spawn(move || {
                let mut stderr = std::io::stderr();
                for line in rx {
                    // A write that fails (a closed pipe) loses the line.
                    if stderr.write_all(&line).is_err() {
                        dropped();
                    }
                    written.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .ok()
            .map(|_| Sink { tx, pending })
    })
    .as_ref()
}

/// One line lost.
fn dropped() {
    metrics::counter!(crate::telemetry::BACKGROUND_FAILURES, "task" => "log_output").increment(1);
}

/// The `io::Write` tracing-subscriber formats each event into (one
/// `write_all` per event): never fails, never blocks.
pub struct LogOutput;

impl Write for LogOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match sink() {
            Some(sink) => {
                sink.pending.fetch_add(1, Ordering::AcqRel);
                if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                    sink.tx.try_send(buf.to_vec())
                {
                    sink.pending.fetch_sub(1, Ordering::AcqRel);
                    dropped();
                }
            }
            None => {
                let _ = std::io::stderr().write_all(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until the queued lines are written (the process is about to end),
/// at most `within`.
pub fn flush(within: Duration) {
    let Some(sink) = sink() else { return };
    let deadline = Instant::now() + within;
    while sink.pending.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One line to stderr for a person (a command's error): after the log
/// lines before it, and never a panic when stderr is gone.
pub fn say(line: &str) {
    flush(Duration::from_secs(1));
    let _ = writeln!(std::io::stderr(), "{line}");
}
