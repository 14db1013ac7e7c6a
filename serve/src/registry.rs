//! The export registry: name -> export. The only place exports are opened and closed.

use crate::export::{Export, ExportInfo, Opener, ServeError};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use vstor_core::ErrorKind;

/// The longest export name (NBD allows 4096 bytes; names here are meant to be typed).
pub const MAX_NAME: usize = 255;

/// The exports of a daemon. Lookups take a read lock for the time of a map lookup only; the
/// data path holds `Arc<Export>`s and never touches the registry.
pub struct Registry {
    opener: Arc<dyn Opener>,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    /// Serializes adds, so two adds of one name cannot both open the target.
    adding: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("exports", &self.names())
            .finish_non_exhaustive()
    }
}

/// Checks an export name: 1 to 255 bytes of letters, digits and `._:-`.
pub fn check_name(name: &str) -> Result<(), ServeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ServeError::invalid(format!(
            "invalid export name '{}': use 1 to {MAX_NAME} letters, digits and . _ : -",
            name.escape_debug()
        )))
    }
}

impl Registry {
    /// An empty registry that opens targets with `opener`.
    pub fn new(opener: Arc<dyn Opener>) -> Self {
        Registry {
            opener,
            exports: RwLock::new(BTreeMap::new()),
            adding: std::sync::Mutex::new(()),
        }
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens `target` and serves it as `name`.
    pub fn add(
        &self,
        name: &str,
        target: &str,
        read_only: bool,
    ) -> Result<Arc<Export>, ServeError> {
        check_name(name)?;
        let _g = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        if self.map().contains_key(name) {
            return Err(ServeError::new(
                ErrorKind::InvalidInput,
                format!("an export named '{name}' exists already"),
            ));
        }
        let opened = self.opener.open(name, target, read_only)?;
        let export = Arc::new(Export::new(name, target, read_only, opened));
        self.exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), export.clone());
        Ok(export)
    }

    /// The export `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Export>, ServeError> {
        self.map().get(name).cloned().ok_or_else(|| not_found(name))
    }

    /// Stops serving `name`: its connections are closed, and its stack (with its locks) is
    /// closed once the last request in flight has finished. Returns the export, so a caller can
    /// wait for that ([`Registry::remove_and_wait`]).
    pub fn remove(&self, name: &str) -> Result<Arc<Export>, ServeError> {
        let e = self
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| not_found(name))?;
        e.close_connections();
        Ok(e)
    }

    /// Removes `name` and waits (up to `timeout`) until nothing else holds it, so its files are
    /// closed and unlocked when this returns. Flushes it first.
    pub fn remove_and_wait(
        &self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<(), ServeError> {
        let e = self.remove(name)?;
        // Requests its clients left waiting behind a QoS cap need not wait it out.
        let _ = e.set_qos(Some(0), Some(0));
        let flushed = e.device().flush();
        let deadline = std::time::Instant::now() + timeout;
        while Arc::strong_count(&e) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if Arc::strong_count(&e) > 1 {
            return Err(ServeError::new(
                ErrorKind::InUse,
                format!("export '{name}' was removed, but a client still holds it"),
            ));
        }
        flushed.map_err(ServeError::from)
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.map().values().map(|e| e.info()).collect()
    }

    /// The names of the exports.
    pub fn names(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    /// Every export.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.map().values().cloned().collect()
    }

    /// Samples every export's counters (for rates).
    pub fn sample(&self) {
        for e in self.exports() {
            e.sample();
        }
    }
}

fn not_found(name: &str) -> ServeError {
    ServeError::new(ErrorKind::NotFound, format!("no export named '{name}'"))
}
