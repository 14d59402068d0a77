//! A sink for the logging tests: it keeps what it was given and counts the writes.

use std::io;
use std::sync::{Arc, Mutex};

/// A sink that records what it was given and how many writes it took.
#[derive(Clone, Default)]
pub(crate) struct Counting(pub(crate) Arc<Mutex<(Vec<u8>, usize)>>);

impl io::Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut seen = self.0.lock().expect("lock");
        seen.0.extend_from_slice(buf);
        seen.1 += 1;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Counting {
    /// The lines it was given, and the writes they took.
    pub(crate) fn lines(&self) -> (usize, usize) {
        let seen = self.0.lock().expect("lock");
        (seen.0.iter().filter(|&&b| b == b'\n').count(), seen.1)
    }
}
