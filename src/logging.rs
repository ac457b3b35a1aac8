//! Log output: text or JSON lines on stderr, with a level filter that a config reload can
//! change while pgtenant runs. `RUST_LOG`, when set, wins over the config's level.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn filter(level: &str) -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
    }
}

/// Installs the process's logger (once; later calls do nothing).
pub fn init(cfg: &LogConfig) {
    let (level, handle) = reload::Layer::new(filter(&cfg.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let done = match cfg.format {
        LogFormat::Text => Registry::default()
            .with(level)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .try_init(),
        LogFormat::Json => Registry::default()
            .with(level)
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if done.is_ok() {
        let _ = LEVEL.set(handle);
    }
}

/// Applies a reloaded config's level (the format needs a restart).
pub fn set_level(level: &str) {
    if let Some(h) = LEVEL.get() {
        if h.modify(|f| *f = filter(level)).is_ok() {
            tracing::info!(level, "log level changed");
        }
    }
}
