//! Reloading of rotated PEM files: a set of files read together, fingerprinted, and watched
//! by a task that hands each changed set to whoever builds a configuration from it.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::pem::read;
use crate::error::ConfigError;

/// PEM files that are read together, so that a reload sees one consistent set, each named by
/// the variable it came from.
#[derive(Debug, Clone, Default)]
pub struct WatchedFiles {
    files: Vec<(&'static str, PathBuf)>,
}

impl WatchedFiles {
    /// Adds `path`, set by `var`.
    #[must_use]
    pub fn with(mut self, var: &'static str, path: &Path) -> Self {
        self.files.push((var, path.to_owned()));
        self
    }

    /// Reads every file; the first that cannot be read is an error naming its variable.
    pub fn read(&self) -> Result<FileSet, ConfigError> {
        let contents = self
            .files
            .iter()
            .map(|(var, path)| read(var, path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FileSet { contents })
    }

    /// [`WatchedFiles::read`] on the blocking pool: a slow volume must not stall the serving
    /// thread (one by default).
    async fn read_off_thread(&self) -> Result<FileSet, ConfigError> {
        let files = self.clone();
        tokio::task::spawn_blocking(move || files.read())
            .await
            .map_err(|err| {
                ConfigError::new(
                    "TLS_RELOAD_INTERVAL_SECONDS",
                    format!("reading the TLS files failed: {err}"),
                )
            })?
    }
}

/// The bytes of [`WatchedFiles`], in the order they were added.
#[derive(Debug, Clone)]
pub struct FileSet {
    contents: Vec<Vec<u8>>,
}

impl FileSet {
    /// The bytes of the `index`-th file; empty when there is none.
    pub fn get(&self, index: usize) -> &[u8] {
        self.contents.get(index).map_or(&[], Vec::as_slice)
    }

    /// A hash of every file's bytes, to notice a change.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.contents.hash(&mut hasher);
        hasher.finish()
    }
}

/// `tls_reloads_total{result="ok|error"}` (or another name), which counts changed file sets.
#[derive(Debug, Clone, Default)]
pub struct ReloadMetrics {
    reloads: Family<ResultLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl ReloadMetrics {
    /// Registers the counter as `name` (`_total` is added).
    pub fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let this = Self::default();
        // Both results from the start, at 0: "no reload failed" reads as 0, not as no data.
        for result in ["ok", "error"] {
            let _ = this.reloads.get_or_create(&ResultLabel { result });
        }
        registry.register(name, help, this.reloads.clone());
        this
    }

    fn count(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }
}

/// Watches `files` every `interval` until `stop` is cancelled. `loaded` is the fingerprint of
/// the set in use, taken from the very bytes it was built from, so that a change made between
/// that first read and the watcher's start is seen too. A changed set is handed to `apply`: when
/// it succeeds the set is counted as `ok`; when it fails (a half-written rotation, a key that
/// does not match) the error is logged, counted once as `error`, and what is in use stays.
pub fn spawn_reloader(
    what: &'static str,
    files: WatchedFiles,
    interval: Duration,
    loaded: u64,
    metrics: ReloadMetrics,
    stop: CancellationToken,
    mut apply: impl FnMut(&FileSet) -> Result<(), ConfigError> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut last = loaded;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let set = match files.read_off_thread().await {
                Ok(set) => set,
                Err(err) => {
                    tracing::warn!(what, error = %err, "TLS files unreadable; keeping the loaded ones");
                    continue;
                }
            };
            let fingerprint = set.fingerprint();
            if fingerprint == last {
                continue;
            }
            // Counted once per changed set, not on every tick.
            last = fingerprint;
            match apply(&set) {
                Ok(()) => {
                    metrics.count("ok");
                    tracing::info!(what, "reloaded changed TLS files");
                }
                Err(err) => {
                    metrics.count("error");
                    tracing::warn!(what, error = %err, "changed TLS files are not valid; keeping the loaded ones");
                }
            }
        }
    });
}
