//! The flow log file with size-based rotation (`--flow-log-max-size`,
//! `--flow-log-max-files`): when the next line would take the file past the
//! limit, `F` becomes `F.1` (`F.1` becomes `F.2`, ...; the oldest beyond the
//! limit is removed) and a new `F` is started. Lines are never split.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Default largest file before rotation: 100 MiB.
pub const DEFAULT_MAX_SIZE: u64 = 100 * 1024 * 1024;
/// Default rotated files kept (`F.1` .. `F.5`).
pub const DEFAULT_MAX_FILES: u32 = 5;

pub struct RotatingFile {
    path: PathBuf,
    /// 0: never rotate.
    max_size: u64,
    /// `--flow-log-max-size` (what `max_size` is for a regular file).
    configured_max_size: u64,
    max_files: u32,
    out: BufWriter<File>,
    size: u64,
}

impl RotatingFile {
    /// Opens `path` for appending. Only a regular file rotates: `/dev/null`,
    /// `/dev/stdout`, a FIFO or a socket is written to as it is, never renamed
    /// (renaming `/dev/null` and creating a regular file in its place broke
    /// every program on the machine that read it).
    pub fn open(path: &Path, max_size: u64, max_files: u32) -> io::Result<Self> {
        let file = open_append(path)?;
        let meta = file.metadata()?;
        let size = meta.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max_size: if meta.is_file() { max_size } else { 0 },
            configured_max_size: max_size,
            max_files,
            out: BufWriter::new(file),
            size,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        // The path may have been replaced since it was opened: rotate only a
        // regular file (never a device or a link to one).
        if !std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_file()) {
            self.size = 0;
            return Ok(());
        }
        if self.max_files == 0 {
            // No history wanted: start the file again.
            std::fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            std::fs::remove_file(self.rotated(self.max_files)).or_else(ignore_missing)?;
            for n in (1..self.max_files).rev() {
                std::fs::rename(self.rotated(n), self.rotated(n + 1)).or_else(ignore_missing)?;
            }
            std::fs::rename(&self.path, self.rotated(1)).or_else(ignore_missing)?;
        }
        self.out = BufWriter::new(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

impl super::FlowOutput for RotatingFile {
    /// Opens the path again (logrotate without `copytruncate` renamed the file
    /// and sends SIGHUP): later lines go to the file now at the path, created
    /// if there is none.
    fn reopen(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let file = open_append(&self.path)?;
        let meta = file.metadata()?;
        self.size = meta.len();
        self.max_size = if meta.is_file() {
            self.configured_max_size
        } else {
            0
        };
        self.out = BufWriter::new(file);
        Ok(())
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Write for RotatingFile {
    /// Called with whole lines by the writer thread; a line is never split
    /// across two files (a line longer than the limit gets a file of its own).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len() as u64;
        if self.max_size > 0 && self.size > 0 && self.size + len > self.max_size {
            self.rotate()?;
        }
        self.out.write_all(buf)?;
        self.size += len;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO (as `/dev/null` or `/dev/stdout` would be) is written to, never
    /// renamed or replaced, however much goes through it.
    #[test]
    fn only_a_regular_file_rotates() {
        let dir = std::env::temp_dir().join(format!("weir-rotate-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("flows");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A reader, so the writer's open does not block and writes are drained.
        use std::os::unix::fs::OpenOptionsExt;
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut f = RotatingFile::open(&fifo, 100, 2).unwrap();
        let mut sink = Vec::new();
        for i in 0..50 {
            f.write_all(format!("line {i} of a flow log that goes nowhere\n").as_bytes())
                .unwrap();
            f.flush().unwrap();
            let _ = std::io::Read::read_to_end(&mut reader, &mut sink);
        }
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::symlink_metadata(&fifo).unwrap();
        assert!(meta.file_type().is_fifo(), "the FIFO was replaced");
        assert!(!dir.join("flows.1").exists(), "the FIFO was renamed");
        assert!(sink.len() > 100 * 10, "the lines went through the FIFO");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// logrotate's way: rename the file, then reopen (SIGHUP): the renamed
    /// file keeps what was written, new lines go to a new file at the path.
    #[test]
    fn reopen_starts_a_new_file_after_a_rename() {
        use crate::flows::FlowOutput;
        let dir = std::env::temp_dir().join(format!("weir-reopen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.log");
        let mut f = RotatingFile::open(&path, 0, 2).unwrap();
        f.write_all(b"one\n").unwrap();
        f.flush().unwrap();
        std::fs::rename(&path, dir.join("flows.log.old")).unwrap();
        f.write_all(b"two\n").unwrap();
        f.reopen().unwrap();
        f.write_all(b"three\n").unwrap();
        f.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("flows.log.old")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotates_at_line_boundaries_and_keeps_max_files() {
        let dir = std::env::temp_dir().join(format!("weir-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        let line = format!("{}\n", "x".repeat(39)); // 40 bytes
        for _ in 0..9 {
            f.write_all(line.as_bytes()).unwrap();
        }
        f.flush().unwrap();
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        // 2 lines per file (a third would make 120 > 100): 9 lines = 5 files,
        // of which the newest 3 are kept.
        assert_eq!(size(&path), Some(40));
        assert_eq!(size(&dir.join("flows.jsonl.1")), Some(80));
        assert_eq!(size(&dir.join("flows.jsonl.2")), Some(80));
        assert_eq!(size(&dir.join("flows.jsonl.3")), None);
        // Reopening continues the current file's size.
        drop(f);
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        f.write_all(line.as_bytes()).unwrap();
        f.write_all(line.as_bytes()).unwrap();
        f.flush().unwrap();
        assert_eq!(size(&path), Some(40));
        assert_eq!(size(&dir.join("flows.jsonl.1")), Some(80));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
