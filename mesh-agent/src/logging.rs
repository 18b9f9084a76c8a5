//! The agent's log: text (no ANSI colours unless on a terminal) or JSON, with a level filter that
//! the admin API's `/logging` changes while the agent runs.

use std::{io::IsTerminal as _, sync::OnceLock};

use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt as _, reload};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Why a filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter {filter:?}: {reason}")]
    Invalid { filter: String, reason: String },
    #[error("logging was not set up by this process")]
    NotInstalled,
    #[error("changing the filter failed: {0}")]
    Reload(String),
}

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the process's logger: `RUST_LOG`'s filter, else `info`.
pub fn init(format: Format) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stdout().is_terminal();
    let subscriber = tracing_subscriber::registry().with(filter);
    let installed = match format {
        Format::Text => {
            let layer = tracing_subscriber::fmt::layer().with_ansi(ansi);
            tracing::subscriber::set_global_default(subscriber.with(layer))
        }
        Format::Json => {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_ansi(false);
            tracing::subscriber::set_global_default(subscriber.with(layer))
        }
    };
    if installed.is_ok() {
        let _ = CONTROL.set(Control {
            handle,
            current: std::sync::Mutex::new(spec),
        });
    }
}

/// The filter in force, e.g. `info` or `info,mesh_agent::proxy=debug`.
pub fn current_filter() -> Option<String> {
    let control = CONTROL.get()?;
    Some(
        control
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    )
}

/// Replaces the filter (the `RUST_LOG` syntax: `debug`, `warn,mesh_agent::proxy=debug`).
pub fn set_filter(spec: &str) -> Result<(), FilterError> {
    let filter = EnvFilter::try_new(spec).map_err(|err| FilterError::Invalid {
        filter: spec.to_owned(),
        reason: err.to_string(),
    })?;
    let control = CONTROL.get().ok_or(FilterError::NotInstalled)?;
    control
        .handle
        .reload(filter)
        .map_err(|err| FilterError::Reload(err.to_string()))?;
    *control.current.lock().unwrap_or_else(|p| p.into_inner()) = spec.to_owned();
    tracing::warn!(filter = spec, "log filter changed");
    Ok(())
}
