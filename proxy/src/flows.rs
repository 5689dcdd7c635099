//! Where flow records go: JSON lines to stdout or a file, and the flow bus
//! (the ring of recent records and live `weir observe` readers), all done by a
//! dedicated thread so that no connection ever waits for I/O or for a reader.
//!
//! `emit`/`emit_all` render the record where it was made (its JSON, once for
//! the file and every reader) and hand it to a bounded queue; the writer thread
//! drains whatever is queued, writes it, flushes once per batch and publishes
//! the batch on the [`FlowBus`]. Rendering where the record is made spreads it
//! over the workers rather than one thread, and frees a record's small
//! allocations on the thread that made them rather than across threads
//! (measured: 0.98 of the CPU per gRPC call, DNS within the noise;
//! `tests/perf/README.md`). Kernel event batches, and records made while the
//! queue is full, are rendered by the writer instead. When the queue is full
//! (the disk or the reader of stdout cannot keep up), records are dropped and
//! counted ([`FlowSink::lost`]) with a warning at most once a second: the data
//! path never blocks on the flow log.

pub mod bus;
pub mod kernel;
pub mod metrics;
pub mod rotate;

pub use bus::{Event, FlowBus, FlowFilter, FlowKey, FlowType, PeerFilter, Record, Subscription};

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use weir_policy::flow::Flow;

/// Records queued for the writer at most.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Lines written between two flushes at most.
const BATCH: usize = 1024;

/// Where the writer thread puts records.
pub trait FlowOutput: Write + Send {
    /// Opens the output's path again (after logrotate renamed the file); a
    /// stream has nothing to reopen.
    fn reopen(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Whether lines written here go nowhere (`--flow-log none`): then records
    /// are not rendered unless a reader of the bus asks.
    fn discards(&self) -> bool {
        false
    }
}

/// No flow log (`--flow-log none`): records only reach the bus (the ring that
/// `weir observe` reads, live readers) and the metrics.
pub struct Discard;

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl FlowOutput for Discard {
    fn discards(&self) -> bool {
        true
    }
}

/// Any writer (stdout, a test's buffer): nothing to reopen.
struct Plain(Box<dyn Write + Send>);

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl FlowOutput for Plain {}

/// Standard output, as a flow output (nothing to reopen).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

impl FlowOutput for Stdout {}

enum Msg {
    // A pointer: the queue's slots are allocated up front, so they stay small.
    Record(Arc<Record>),
    Records(Vec<Arc<Record>>),
    /// Answered once everything queued before it is written and flushed.
    Flush(SyncSender<()>),
    /// Wakes the writer to see `reopen` (set before sending).
    Reopen,
}

pub struct FlowSink {
    /// `None` only while dropping.
    tx: Option<SyncSender<Msg>>,
    lost: AtomicU64,
    /// Milliseconds since `epoch` before which no "records lost" warning is logged.
    next_warning_ms: AtomicU64,
    epoch: Instant,
    bus: Arc<FlowBus>,
    /// Set by [`FlowSink::reopen`], taken by the writer before its next write.
    reopen: Arc<AtomicBool>,
    /// Records are rendered as they are made (else when a reader asks: the
    /// output discards them).
    render_now: bool,
    /// The queue was full at the last send and the writer has not emptied it
    /// since: records are not rendered here (most would be dropped, and a
    /// record still queued is rendered by the writer).
    saturated: Arc<AtomicBool>,
}

impl FlowSink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self::with_bus(out, QUEUE_CAPACITY, FlowBus::new(bus::DEFAULT_CAPACITY))
    }

    /// A sink whose queue holds `capacity` messages (a batch from `emit_all` is one).
    pub fn with_capacity(out: Box<dyn Write + Send>, capacity: usize) -> Self {
        Self::with_bus(out, capacity, FlowBus::new(bus::DEFAULT_CAPACITY))
    }

    /// A sink that also publishes every record on `bus`.
    pub fn with_bus(out: Box<dyn Write + Send>, capacity: usize, bus: Arc<FlowBus>) -> Self {
        Self::with_output(Box::new(Plain(out)), capacity, bus)
    }

    /// A sink writing to an output that can be reopened ([`FlowSink::reopen`]).
    pub fn with_output(out: Box<dyn FlowOutput>, capacity: usize, bus: Arc<FlowBus>) -> Self {
        let render_now = !out.discards();
        let (tx, rx) = sync_channel(capacity.max(1));
        let writer_bus = bus.clone();
        let reopen = Arc::new(AtomicBool::new(false));
        let writer_reopen = reopen.clone();
        let saturated = Arc::new(AtomicBool::new(false));
        let writer_saturated = saturated.clone();
        std::thread::Builder::new()
            .name("weir-flows".into())
            .spawn(move || write_loop(out, rx, &writer_bus, &writer_reopen, &writer_saturated))
            .expect("spawn the flow-record writer thread");
        FlowSink {
            tx: Some(tx),
            lost: AtomicU64::new(0),
            next_warning_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            bus,
            reopen,
            render_now,
            saturated,
        }
    }

    /// Asks the writer to open the flow log's path again (SIGHUP, after
    /// logrotate renamed the file): records written after this go to a new
    /// file at the path. Never blocks; with the queue full, the writer sees the
    /// request before its next batch anyway.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Msg::Reopen);
        }
    }

    /// The bus every record goes to (for `weir observe`).
    pub fn bus(&self) -> &Arc<FlowBus> {
        &self.bus
    }

    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Records dropped so far because the writer could not keep up.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Queues many records as one batch (the kernel's events come in batches,
    /// up to thousands at once). These are rendered by the writer thread: a
    /// batch rendered here would hold up its caller's other work for
    /// milliseconds.
    pub fn emit_all(&self, flows: impl Iterator<Item = Flow>) {
        let records: Vec<Arc<Record>> =
            flows.map(|f| Arc::new(Record::lazy(Box::new(f)))).collect();
        if !records.is_empty() {
            let n = records.len() as u64;
            self.send(Msg::Records(records), n);
        }
    }

    /// Queues one record, moved (never cloned: the caller is done with it),
    /// rendered here unless the output discards it.
    pub fn emit(&self, flow: Flow) {
        let record = self.record(flow);
        self.send(Msg::Record(record), 1);
    }

    fn record(&self, flow: Flow) -> Arc<Record> {
        Arc::new(
            if self.render_now && !self.saturated.load(Ordering::Relaxed) {
                Record::rendered(&flow)
            } else {
                Record::lazy(Box::new(flow))
            },
        )
    }

    /// Waits (at most `timeout`) until every record queued so far is written and
    /// flushed. For shutdown and tests; the data path never calls it.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = sync_channel(1);
        let Some(tx) = &self.tx else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        let mut msg = Msg::Flush(done_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    fn send(&self, msg: Msg, records: u64) {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.try_send(msg).is_ok());
        if !sent {
            self.saturated.store(true, Ordering::Relaxed);
            let total = self.lost.fetch_add(records, Ordering::Relaxed) + records;
            self.bus.metrics().lost.inc_by(records);
            self.warn_lost(total);
        }
    }

    fn warn_lost(&self, total: u64) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_warning_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_warning_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                lost = total,
                "flow-record writer cannot keep up; records are dropped"
            );
        }
    }
}

impl Drop for FlowSink {
    /// Writes what is still queued (waiting at most a second for a stuck output).
    fn drop(&mut self) {
        self.flush(Duration::from_secs(1));
        // The writer thread ends when it sees the queue closed.
        self.tx.take();
    }
}

/// Writes `r`'s line to the flow log unless that discards it (then the
/// record was not rendered, and is not now). One write per line: the
/// rotating file never splits a line. After a failed write the batch's other
/// lines are not tried.
fn write_record(out: &mut dyn FlowOutput, r: &Record, result: &mut std::io::Result<()>) {
    if result.is_ok() && !out.discards() {
        *result = out.write_all(r.line().as_bytes());
    }
}

fn write_loop(
    mut out: Box<dyn FlowOutput>,
    rx: Receiver<Msg>,
    bus: &FlowBus,
    reopen: &AtomicBool,
    saturated: &AtomicBool,
) {
    let mut failing = false;
    let mut acks = Vec::new();
    let mut batch: Vec<Arc<Record>> = Vec::new();
    // Block for the first message, then take what else is already queued.
    while let Ok(first) = rx.recv() {
        if reopen.swap(false, Ordering::Acquire) {
            match out.flush().and_then(|()| out.reopen()) {
                Ok(()) => tracing::info!("flow log reopened"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not reopen the flow log; writing to the old file")
                }
            }
        }
        let mut result = Ok(());
        let mut written = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => {
                    write_record(&mut *out, &r, &mut result);
                    batch.push(r);
                    written += 1;
                }
                Msg::Records(records) => {
                    written += records.len();
                    for r in records {
                        write_record(&mut *out, &r, &mut result);
                        batch.push(r);
                    }
                }
                Msg::Flush(ack) => acks.push(ack),
                Msg::Reopen => {}
            }
            if written < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if written < BATCH {
            // The queue is empty: senders render their records again.
            saturated.store(false, Ordering::Relaxed);
        }
        result = result.and_then(|()| out.flush());
        // Readers see a batch once it is in the file.
        bus.publish(&batch);
        batch.clear();
        match result {
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not write flow records");
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
        for ack in acks.drain(..) {
            let _ = ack.try_send(());
        }
        // Let the next records pile up rather than be woken for each one: a
        // sender only pays for a wake-up when the writer waits in `recv`, and
        // a wake-up per record cost the data plane more than the record. A
        // full batch means more are queued already: no pause then, so the
        // pause never limits how many records a second get written.
        if written < BATCH {
            std::thread::sleep(COALESCE);
        }
    }
    let _ = out.flush();
}

/// How long the writer lets records gather after writing a batch that emptied
/// the queue. Longer pauses mean fewer wake-ups but colder records: 20 ms measured
/// the same as 5 ms (weir/weir 0.98 at 2 000 gRPC calls/s, 1.01 at max), 50 ms
/// cost 14 % more (tests/perf/README.md).
const COALESCE: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};
    use weir_policy::flow::{FlowPeers, RenderedEndpoint};

    fn flow(i: u16) -> Flow {
        let ep = Arc::new(RenderedEndpoint::new(weir_policy::flow::Endpoint {
            id: None,
            identity: 2,
            labels: vec!["reserved:world".into()],
            namespace: None,
            pod_name: None,
        }));
        let peers = FlowPeers {
            source: ep.clone(),
            destination: ep,
            node_name: Arc::from("t"),
        };
        let verdict = weir_policy::Verdict {
            allowed: true,
            rules: vec![],
            denied_in: None,
            l7: false,
        };
        Flow::with_peers(
            &peers,
            ("10.0.0.1".parse().unwrap(), i),
            ("10.0.0.2".parse().unwrap(), 80),
            &verdict,
        )
    }

    /// An output that blocks every write until released, and counts lines.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<(bool, usize)>, Condvar)>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut g = cv
                .wait_while(m.lock().unwrap(), |(open, _)| !*open)
                .unwrap();
            g.1 += buf.iter().filter(|b| **b == b'\n').count();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Gate {
        fn open(&self) {
            let (m, cv) = &*self.0;
            m.lock().unwrap().0 = true;
            cv.notify_all();
        }
        fn lines(&self) -> usize {
            self.0.0.lock().unwrap().1
        }
    }

    /// With the output stuck, emitting never blocks: what does not fit in the
    /// queue is dropped and counted, and the rest is written once it moves.
    #[test]
    fn a_stuck_output_never_blocks_emit_and_losses_are_counted() {
        let gate = Gate::default();
        let sink = FlowSink::with_capacity(Box::new(gate.clone()), 8);
        let started = Instant::now();
        for i in 0..100 {
            sink.emit(flow(i));
        }
        sink.emit_all((100..110).map(flow));
        assert!(started.elapsed() < Duration::from_secs(1));
        let lost = sink.lost();
        // At most 8 messages queued (one of them may be emit_all's batch of 10
        // records), and at most one batch of messages taken off by the writer.
        assert!(lost >= 110 - (7 + 10) - 9, "lost {lost}");
        assert!(lost < 110, "lost {lost}");
        gate.open();
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(gate.lines() as u64 + lost, 110);
        assert!(
            sink.bus()
                .metrics()
                .encode()
                .contains(&format!("weir_flows_lost_total {lost}\n")),
            "{}",
            sink.bus().metrics().encode()
        );
    }

    /// Records are written promptly, without an explicit flush.
    #[test]
    fn records_reach_the_output_promptly() {
        let gate = Gate::default();
        gate.open();
        let sink = FlowSink::new(Box::new(gate.clone()));
        sink.emit(flow(1));
        sink.emit_all((2..5).map(flow));
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.lines() < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(gate.lines(), 4);
        assert_eq!(sink.lost(), 0);
    }

    /// Every emitted record reaches the bus with the same JSON as the file.
    #[test]
    fn records_are_published_on_the_bus_as_written() {
        let gate = Gate::default();
        gate.open();
        let bus = FlowBus::new(3);
        let sink = FlowSink::with_bus(Box::new(gate.clone()), 16, bus.clone());
        let (_, sub) = bus.query(FlowFilter::default(), 0, true, 16);
        let mut sub = sub.unwrap();
        sink.emit(flow(1));
        sink.emit_all((2..6).map(flow));
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(gate.lines(), 5);
        assert_eq!(bus.len(), 3, "bounded by --flow-buffer");
        let mut n = 0;
        while let Some(Event::Flow(r)) = sub.try_next() {
            n += 1;
            let v: serde_json::Value = serde_json::from_str(r.json()).unwrap();
            assert_eq!(
                v["l4"]["TCP"]["source_port"],
                r.key.ports.map_or(0, |p| p.0)
            );
        }
        assert_eq!(n, 5);
    }

    /// Records are rendered where they are made, except while the queue is
    /// full (most would be dropped): those that still get in are rendered by
    /// the writer, and rendering at emit resumes once the writer caught up.
    #[test]
    fn a_full_queue_leaves_rendering_to_the_writer_until_it_caught_up() {
        let gate = Gate::default();
        let bus = FlowBus::new(64);
        let sink = FlowSink::with_bus(Box::new(gate.clone()), 4, bus.clone());
        let (_, sub) = bus.query(FlowFilter::default(), 0, true, 64);
        let mut sub = sub.unwrap();
        for i in 0..20 {
            sink.emit(flow(i));
        }
        let lost = sink.lost();
        assert!(lost > 0);
        assert!(sink.saturated.load(Ordering::Relaxed), "found full");
        gate.open();
        assert!(sink.flush(Duration::from_secs(5)));
        assert!(
            !sink.saturated.load(Ordering::Relaxed),
            "the writer caught up"
        );
        // A record that gets in while the flag is up (the writer took some off
        // but has not found the queue empty yet) is the writer's to render.
        sink.saturated.store(true, Ordering::Relaxed);
        sink.emit(flow(100));
        assert!(sink.flush(Duration::from_secs(5)));
        assert!(!sink.saturated.load(Ordering::Relaxed));
        sink.emit(flow(101));
        assert!(sink.flush(Duration::from_secs(5)));
        let mut seen = Vec::new();
        while let Some(Event::Flow(r)) = sub.try_next() {
            seen.push(r);
        }
        assert_eq!(seen.len() as u64, 22 - lost);
        assert_eq!(gate.lines(), seen.len());
        let made: Vec<bool> = seen.iter().map(|r| r.rendered_when_made()).collect();
        assert!(made[..made.len() - 2].iter().all(|m| *m));
        assert_eq!(made[made.len() - 2..], [false, true]);
        for r in &seen {
            let v: serde_json::Value = serde_json::from_str(r.json()).unwrap();
            assert_eq!(
                v["l4"]["TCP"]["source_port"],
                r.key.ports.map_or(0, |p| p.0)
            );
            assert!(r.line().ends_with('\n') && !r.json().ends_with('\n'));
        }
    }

    /// `--flow-log none`: nothing is written, the records still reach the bus,
    /// and a reader gets the very JSON the flow log would have had.
    #[test]
    fn a_discarding_log_still_publishes_every_record_rendered_when_read() {
        let bus = FlowBus::new(8);
        let sink = FlowSink::with_output(Box::new(Discard), 16, bus.clone());
        let (_, sub) = bus.query(FlowFilter::default(), 0, true, 16);
        let mut sub = sub.unwrap();
        sink.emit(flow(1));
        sink.emit_all((2..4).map(flow));
        assert!(sink.flush(Duration::from_secs(5)));
        let mut seen = Vec::new();
        while let Some(Event::Flow(r)) = sub.try_next() {
            seen.push(r);
        }
        assert_eq!(seen.len(), 3);
        for (r, port) in seen.iter().zip(1..) {
            let mut line = flow(port).to_json_line();
            line.pop();
            // The time differs (the record's own); everything else is the same.
            let mut want: serde_json::Value = serde_json::from_str(&line).unwrap();
            let mut got: serde_json::Value = serde_json::from_str(r.json()).unwrap();
            want["time"] = serde_json::Value::Null;
            got["time"] = serde_json::Value::Null;
            assert_eq!(got, want);
            assert!(std::ptr::eq(r.json(), r.json()), "rendered once");
        }
        assert_eq!(bus.len(), 3);
        assert_eq!(sink.lost(), 0);
    }
}
