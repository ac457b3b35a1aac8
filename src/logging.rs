//! Log output: text or JSON lines on stderr, with a level filter that a config reload can
//! change while pgtenant runs. `RUST_LOG`, when set, wins over the config's level.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context as TaskContext, Poll};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{span, Event, Metadata, Span, Subscriber};
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

    /// Runs before the output layer formats the event: a `LazySpan` being polled enters its
    /// span now, so the line carries it.
    fn on_event(&self, _event: &Event<'_>, _ctx: Context<'_, S>) {
        enter_polled_span();
    }
}

thread_local! {
    /// The span of the `LazySpan` this thread is polling, and whether it was entered.
    static POLLED_SPAN: RefCell<(Option<Span>, bool)> = const { RefCell::new((None, false)) };
}

fn enter_polled_span() {
    let _ = POLLED_SPAN.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if let (Some(span), false) = (&p.0, p.1) {
                span.with_subscriber(|(id, d)| d.enter(id));
                p.1 = true;
            }
        }
    });
}

pin_project_lite::pin_project! {
    /// Like `tracing::Instrumented`, for a task that is polled often and logs rarely (a
    /// transaction-mode session: two polls per transaction). Entering a span costs the span
    /// registry about 270 instructions per poll; this one is entered only when the task logs
    /// something (the level layer's `on_event`), or on every poll while directives filter,
    /// since those may look at the span. Events still carry the span as with `Instrumented`.
    pub struct LazySpan<F> {
        #[pin]
        inner: F,
        span: Option<Span>,
    }
}

impl<F> LazySpan<F> {
    fn new(inner: F, span: Span) -> Self {
        LazySpan {
            inner,
            span: Some(span),
        }
    }
}

/// Spawns `task` carrying `span` as a `LazySpan`; without any wrapper when the span is off at
/// this level (a span stays so), which costs nothing per poll.
pub fn spawn_in_span<F>(task: F, span: Span)
where
    F: Future<Output = ()> + Send + 'static,
{
    if span.is_disabled() {
        tokio::spawn(task);
    } else {
        tokio::spawn(LazySpan::new(task, span));
    }
}

/// Puts back what a `LazySpan` poll found in `POLLED_SPAN`, also when the poll panics.
struct Restore<'a> {
    prev: (Option<Span>, bool),
    span: &'a mut Option<Span>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let prev = std::mem::take(&mut self.prev);
        let (span, entered) = POLLED_SPAN
            .try_with(|p| std::mem::replace(&mut *p.borrow_mut(), prev))
            .unwrap_or_default();
        if let Some(span) = span {
            if entered {
                span.with_subscriber(|(id, d)| d.exit(id));
            }
            *self.span = Some(span);
        }
    }
}

impl<F: Future> Future for LazySpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let span = this.span.take();
        let eager = GATE.get().is_some_and(|g| g.plain().is_none());
        let prev = POLLED_SPAN
            .try_with(|p| std::mem::replace(&mut *p.borrow_mut(), (span, false)))
            .unwrap_or_default();
        let _restore = Restore {
            prev,
            span: this.span,
        };
        if eager {
            enter_polled_span();
        }
        this.inner.poll(cx)
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

    /// What a subscriber saw: span entries, and the span current at each event.
    #[derive(Default)]
    struct Seen {
        entered: std::sync::atomic::AtomicUsize,
        current_at_events: std::sync::Mutex<Vec<Option<String>>>,
    }

    struct Watch(Arc<Seen>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Watch {
        fn on_enter(&self, _id: &span::Id, _ctx: Context<'_, S>) {
            self.0.entered.fetch_add(1, Ordering::SeqCst);
        }

        fn on_event(&self, _event: &Event<'_>, ctx: Context<'_, S>) {
            let current = ctx.lookup_current().map(|s| s.name().to_string());
            self.0.current_at_events.lock().expect("lock").push(current);
        }
    }

    /// Polls `f` to completion under a subscriber like the process's (level layer first),
    /// inside a `LazySpan` of a span named "session"; then runs `after`, outside it.
    fn run_lazy(f: impl Future<Output = ()>, after: impl FnOnce()) -> Arc<Seen> {
        let seen = Arc::new(Seen::default());
        let subscriber = Registry::default()
            .with(GateLayer(Arc::new(gate("info"))))
            .with(Watch(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session");
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            rt.block_on(LazySpan::new(f, span));
            after();
        });
        seen
    }

    #[test]
    fn a_lazy_span_that_logs_nothing_is_never_entered() {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let polls = async {
            tokio::task::yield_now().await;
            tracing::debug!("below the level");
        };
        let seen = run_lazy(polls, || {});
        assert_eq!(seen.entered.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_event_in_a_lazy_span_carries_the_span() {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let polls = async {
            tracing::info!("first poll");
            tokio::task::yield_now().await;
            tracing::warn!("second poll");
        };
        let seen = run_lazy(polls, || {});
        assert_eq!(
            *seen.current_at_events.lock().expect("lock"),
            vec![Some("session".to_string()), Some("session".to_string())]
        );
        assert_eq!(
            seen.entered.load(Ordering::SeqCst),
            2,
            "once per poll that logged"
        );
    }

    #[test]
    fn a_lazy_span_is_left_after_each_poll() {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let seen = run_lazy(async { tracing::info!("inside") }, || {
            tracing::info!("outside")
        });
        assert_eq!(
            *seen.current_at_events.lock().expect("lock"),
            vec![Some("session".to_string()), None]
        );
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
