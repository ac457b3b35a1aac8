//! Log output: text or JSON lines on stderr, with a level filter that a config reload can
//! change while pgtenant runs. `RUST_LOG`, when set, wins over the config's level.

use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{span, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

static GATE: OnceLock<Arc<Gate>> = OnceLock::new();

/// `Gate::level` when the filter is a list of directives rather than one level.
const DIRECTIVES: u8 = u8::MAX;

/// The level filter. A plain level (`info`, the default) is one atomic byte and leaves span
/// entry alone: each client's task enters its session span on every poll, and an `EnvFilter`
/// behind `reload` takes two read locks per entry and per exit (about 300 instructions per
/// transaction). Directives (`pgtenant::pool=debug`, or `RUST_LOG`) go to an `EnvFilter`.
struct Gate {
    level: AtomicU8,
    directives: RwLock<Option<EnvFilter>>,
}

fn encode(level: LevelFilter) -> u8 {
    match level.into_level() {
        None => 0,
        Some(l) => match l {
            tracing::Level::ERROR => 1,
            tracing::Level::WARN => 2,
            tracing::Level::INFO => 3,
            tracing::Level::DEBUG => 4,
            tracing::Level::TRACE => 5,
        },
    }
}

fn decode(level: u8) -> LevelFilter {
    match level {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

impl Gate {
    /// `RUST_LOG` when set, else the config's level; an invalid one means `info`.
    fn set(&self, level: &str) {
        let (spec, from_env) = match std::env::var("RUST_LOG") {
            Ok(v) if !v.is_empty() => (v, true),
            _ => (level.to_string(), false),
        };
        let (plain, directives) = match LevelFilter::from_str(spec.trim()) {
            Ok(l) => (encode(l), None),
            // RUST_LOG as tracing reads it elsewhere: invalid directives are skipped.
            Err(_) if from_env => (DIRECTIVES, Some(EnvFilter::new(&spec))),
            Err(_) => match EnvFilter::try_new(&spec) {
                Ok(f) => (DIRECTIVES, Some(f)),
                Err(_) => (encode(LevelFilter::INFO), None),
            },
        };
        if let Ok(mut d) = self.directives.write() {
            *d = directives;
        }
        self.level.store(plain, Ordering::Release);
        // Callsites cache whether they are enabled; they ask again.
        tracing::callsite::rebuild_interest_cache();
    }

    /// The plain level, or None when directives decide.
    fn plain(&self) -> Option<LevelFilter> {
        let l = self.level.load(Ordering::Acquire);
        (l != DIRECTIVES).then(|| decode(l))
    }

    fn with_directives<R>(&self, f: impl FnOnce(&EnvFilter) -> R) -> Option<R> {
        let d = self.directives.read().ok()?;
        d.as_ref().map(f)
    }
}

/// The layer holding the process's `Gate`.
struct GateLayer(Arc<Gate>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for GateLayer {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        match self.0.plain() {
            Some(l) if *meta.level() <= l => Interest::always(),
            Some(_) => Interest::never(),
            None => self
                .0
                .with_directives(|f| <EnvFilter as Layer<S>>::register_callsite(f, meta))
                .unwrap_or_else(Interest::sometimes),
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        match self.0.plain() {
            Some(l) => *meta.level() <= l,
            None => self
                .0
                .with_directives(|f| <EnvFilter as Layer<S>>::enabled(f, meta, ctx))
                .unwrap_or(true),
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        match self.0.plain() {
            Some(l) => Some(l),
            None => self
                .0
                .with_directives(|f| <EnvFilter as Layer<S>>::max_level_hint(f))
                .flatten(),
        }
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if self.0.plain().is_none() {
            self.0.with_directives(|f| f.on_new_span(attrs, id, ctx));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if self.0.plain().is_none() {
            self.0.with_directives(|f| f.on_record(id, values, ctx));
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if self.0.plain().is_none() {
            self.0.with_directives(|f| f.on_enter(id, ctx));
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        if self.0.plain().is_none() {
            self.0.with_directives(|f| f.on_exit(id, ctx));
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if self.0.plain().is_none() {
            self.0.with_directives(|f| f.on_close(id, ctx));
        }
    }
}

/// Installs the process's logger (once; later calls do nothing).
pub fn init(cfg: &LogConfig) {
    let gate = Arc::new(Gate {
        level: AtomicU8::new(encode(LevelFilter::INFO)),
        directives: RwLock::new(None),
    });
    gate.set(&cfg.level);
    let level = GateLayer(gate.clone());
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
        let _ = GATE.set(gate);
    }
}

/// Applies a reloaded config's level (the format needs a restart).
pub fn set_level(level: &str) {
    if let Some(g) = GATE.get() {
        g.set(level);
        tracing::info!(level, "log level changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(spec: &str) -> Gate {
        let g = Gate {
            level: AtomicU8::new(0),
            directives: RwLock::new(None),
        };
        g.set(spec);
        g
    }

    #[test]
    fn a_plain_level_needs_no_directives() {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let g = gate("warn");
        assert_eq!(g.plain(), Some(LevelFilter::WARN));
        assert!(g.directives.read().expect("lock").is_none());
    }

    #[test]
    fn directives_go_to_an_env_filter() {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let g = gate("info,pgtenant::pool=debug");
        assert_eq!(g.plain(), None);
        assert!(g.directives.read().expect("lock").is_some());
    }

    #[test]
    fn an_invalid_level_means_info() {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        assert_eq!(gate("pgtenant=[").plain(), Some(LevelFilter::INFO));
    }

    #[test]
    fn every_level_survives_its_encoding() {
        for l in [
            LevelFilter::OFF,
            LevelFilter::ERROR,
            LevelFilter::WARN,
            LevelFilter::INFO,
            LevelFilter::DEBUG,
            LevelFilter::TRACE,
        ] {
            assert_eq!(decode(encode(l)), l);
        }
    }
}
