//! Where flow records go: JSON lines to stdout or a file.

use std::io::Write;
use std::sync::Mutex;

use weir_policy::flow::Flow;

pub struct FlowSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl FlowSink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        FlowSink {
            out: Mutex::new(out),
        }
    }

    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Writes many records with one flush (the kernel's events come in batches).
    pub fn emit_all(&self, flows: impl Iterator<Item = Flow>) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let mut result = Ok(());
        for flow in flows {
            result = result.and_then(|()| out.write_all(flow.to_json_line().as_bytes()));
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "could not write flow records");
        }
    }

    pub fn emit(&self, flow: &Flow) {
        let line = flow.to_json_line();
        // A poisoned lock only means another writer panicked mid-line; keep logging.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "could not write flow record");
        }
    }
}
