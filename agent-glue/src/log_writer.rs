//! weir's own log, written to stderr by a thread of its own (`weir-log`), never
//! by the thread that logs: a proxy worker logs per connection (a denial, a
//! refused loop), and a stderr whose reader stalls (a pipe to a busy log
//! collector) would otherwise stop the data path in `write(2)`.
//!
//! Up to [`QUEUE_LINES`] lines wait; beyond that, lines are dropped rather than
//! block, and the writer says how many once it writes again. At exit,
//! [`ExitFlush`] waits a bounded time for what is queued and never writes
//! anything itself — stdout may be the flow log, and may be stalled too.
//! (tracing-appender's guard did both: it printed to stdout, and could block
//! there, when its queue was full at exit; found by review.)

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Log lines that may wait for stderr.
pub const QUEUE_LINES: usize = 128_000;

/// How long exit waits for queued lines to be written.
const EXIT_FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Counters {
    /// Lines handed to the writer thread and not yet written.
    queued: AtomicUsize,
    /// Lines dropped because the queue was full, not yet reported.
    dropped: AtomicU64,
}

/// The subscriber's writer: each event becomes one [`Line`], queued whole when
/// the event is done.
#[derive(Debug, Clone)]
pub struct LogQueue {
    tx: SyncSender<Vec<u8>>,
    counters: Arc<Counters>,
}

/// One event's text, queued when dropped.
#[derive(Debug)]
pub struct Line<'a> {
    buf: Vec<u8>,
    queue: &'a LogQueue,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let c = &self.queue.counters;
        c.queued.fetch_add(1, Ordering::AcqRel);
        if self
            .queue
            .tx
            .try_send(std::mem::take(&mut self.buf))
            .is_err()
        {
            c.queued.fetch_sub(1, Ordering::AcqRel);
            c.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            buf: Vec::new(),
            queue: self,
        }
    }
}

/// Waits, when dropped, up to a second for the queued lines to be written
/// (keep it until exit).
#[derive(Debug)]
pub struct ExitFlush {
    counters: Arc<Counters>,
    wait: Duration,
}

impl Drop for ExitFlush {
    fn drop(&mut self) {
        let until = Instant::now() + self.wait;
        while self.counters.queued.load(Ordering::Acquire) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Starts the writer thread over `out` (stderr in weir) with room for
/// `capacity` lines.
pub fn start(
    out: impl Write + Send + 'static,
    capacity: usize,
) -> std::io::Result<(LogQueue, ExitFlush)> {
    let (tx, rx) = sync_channel(capacity.max(1));
    let counters = Arc::new(Counters::default());
    let shared = counters.clone();
    std::thread::Builder::new()
        .name("weir-log".into())
        .spawn(move || write_lines(rx, out, &shared))?;
    Ok((
        LogQueue {
            tx,
            counters: counters.clone(),
        },
        ExitFlush {
            counters,
            wait: EXIT_FLUSH,
        },
    ))
}

fn write_lines(rx: Receiver<Vec<u8>>, mut out: impl Write, counters: &Counters) {
    for line in rx {
        // A failed write loses the line: there is nowhere else to say so.
        let _ = out.write_all(&line);
        // Said where it is noticed (lines still queued may be older than the
        // drops): not through tracing, which would queue behind itself; plain
        // text in either log format, like a panic's message.
        let dropped = counters.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "weir: {dropped} log lines dropped: stderr did not keep up"
            );
        }
        counters.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An output the test can stall and read.
    #[derive(Clone, Default)]
    struct Out {
        text: Arc<Mutex<Vec<u8>>>,
        stalled: Arc<Mutex<()>>,
    }

    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _stall = self.stalled.lock().unwrap();
            self.text.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(q: &LogQueue, text: &str) {
        let mut l = q.make_writer();
        l.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_drops_are_counted_not_blocking() {
        let out = Out::default();
        let stall = out.stalled.lock().unwrap();
        let (q, flush) = start(out.clone(), 4).unwrap();
        let began = Instant::now();
        // The writer takes one line and waits on the stalled output; four more
        // fill the queue; the rest are dropped at once.
        for i in 0..20 {
            log(&q, &format!("line {i}\n"));
        }
        assert!(
            began.elapsed() < Duration::from_millis(500),
            "logging blocked"
        );
        std::thread::sleep(Duration::from_millis(50));
        drop(stall);
        log(&q, "after\n");
        drop(flush);
        let text = String::from_utf8(out.text.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() >= 6, "{text}");
        assert_eq!(lines[0], "line 0");
        assert!(
            lines.iter().any(|l| l.contains("log lines dropped")),
            "{text}"
        );
        assert_eq!(*lines.last().unwrap(), "after");
        let numbered: Vec<usize> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
            .collect();
        assert!(numbered.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn exit_waits_for_queued_lines_but_not_for_a_stalled_output() {
        let out = Out::default();
        let (q, flush) = start(out.clone(), 16).unwrap();
        log(&q, "written before exit\n");
        drop(flush);
        assert_eq!(&*out.text.lock().unwrap(), b"written before exit\n");

        let out = Out::default();
        let _stall = out.stalled.lock().unwrap();
        let (q, mut flush) = start(out.clone(), 16).unwrap();
        flush.wait = Duration::from_millis(200);
        log(&q, "never written\n");
        let began = Instant::now();
        drop(flush);
        let took = began.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
