//! LISTEN without a server connection per listener: in transaction mode a database-tier
//! client's LISTEN is held by pgtenant on one connection of its own per (tenant, server,
//! database), and each NotificationResponse on a channel is handed to every client listening
//! on it, which its session delivers between the client's transactions.
//!
//! Only database-tier tenants get here (`TierRules::notifications`): a channel is
//! database-wide, and in that tier the database is the tenant's own. A hub is keyed by the
//! tenant as well, so even two tenants that a config file pointed at one database never share
//! one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use postgres_protocol::message::backend::Message;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{BackendConn, ConnectSpec};
use crate::protocol::messages::notification;
use crate::protocol::{sqlstate, ErrorReport};
use crate::tenancy::tier::quote_ident;

/// Notifications a client may have waiting before the oldest are dropped (with a warning): a
/// client that never reads must not grow pgtenant without bound.
const MAILBOX_LIMIT: usize = 10_000;

/// The application_name of a hub's server connection (pg_stat_activity).
pub const HUB_APPLICATION_NAME: &str = "pgtenant listen";

/// Where a client's notifications wait for its session to deliver them.
#[derive(Default)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Bytes>>,
    /// Something is waiting, or the subscription was lost.
    ready: AtomicBool,
    /// The hub's connection went away: notifications may have been missed.
    lost: AtomicBool,
    waker: AtomicWaker,
}

impl Mailbox {
    /// True when there is something to deliver (or to tell); until then `waker` is woken
    /// when there is.
    pub fn wakes(&self, waker: &std::task::Waker) -> bool {
        if self.ready.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(waker);
        self.ready.load(Ordering::Acquire)
    }

    /// Appends everything waiting to `out`. Err: the subscription was lost.
    pub fn drain_into(&self, out: &mut BytesMut) -> Result<(), SubscriptionLost> {
        self.ready.store(false, Ordering::Release);
        if let Ok(mut q) = self.queue.lock() {
            for m in q.drain(..) {
                out.extend_from_slice(&m);
            }
        }
        if self.lost.load(Ordering::Acquire) {
            return Err(SubscriptionLost);
        }
        Ok(())
    }

    fn post(&self, message: Bytes) {
        if let Ok(mut q) = self.queue.lock() {
            if q.len() >= MAILBOX_LIMIT {
                q.pop_front();
                tracing::warn!("a listening client reads no notifications: its oldest is dropped");
            }
            q.push_back(message);
        }
        self.ring();
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::Release);
        self.ring();
    }

    fn ring(&self) {
        self.ready.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The hub's server connection went away: notifications may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection holding this client's LISTEN was lost")]
pub struct SubscriptionLost;

enum Command {
    Listen {
        channel: Arc<str>,
        subscriber: u64,
        mailbox: Arc<Mailbox>,
        done: oneshot::Sender<Result<(), ErrorReport>>,
    },
    /// None: every channel.
    Unlisten {
        channel: Option<Arc<str>>,
        subscriber: u64,
    },
}

/// A (server, database)'s hub, as its clients reach it.
struct Hub {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
}

/// A hub's (tenant, server, database).
type HubKey = (Arc<str>, Arc<str>, Arc<str>);

/// Every hub of a proxy.
#[derive(Default)]
pub struct ListenHubs {
    hubs: DashMap<HubKey, Arc<Hub>>,
    next_subscriber: AtomicU64,
    next_hub: AtomicU64,
    /// `pgtenant_listen` (unregistered without metrics).
    gauge: Option<prometheus::IntGaugeVec>,
}

impl ListenHubs {
    /// Hubs that count their connections and subscriptions in `gauge` (`Metrics::listen`).
    pub fn with_gauge(gauge: prometheus::IntGaugeVec) -> ListenHubs {
        ListenHubs {
            gauge: Some(gauge),
            ..ListenHubs::default()
        }
    }

    /// A client's handle on the hub of `tenant` on `spec`'s server and database (started
    /// when it has none). Nothing is listened to until `listen`.
    pub fn subscriber(self: &Arc<Self>, tenant: &str, spec: &ConnectSpec) -> Listener {
        Listener {
            hubs: self.clone(),
            key: (
                Arc::from(tenant),
                Arc::from(spec.server.name.as_str()),
                Arc::from(spec.database.as_str()),
            ),
            spec: spec.clone(),
            id: self.next_subscriber.fetch_add(1, Ordering::Relaxed),
            mailbox: Arc::new(Mailbox::default()),
            channels: Vec::new(),
        }
    }

    /// Hubs running now.
    pub fn len(&self) -> usize {
        self.hubs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hubs.is_empty()
    }

    /// Whether a hub holds LISTENs of `tenant` in `database` on server `server`.
    pub fn serves(&self, tenant: &str, server: &str, database: &str) -> bool {
        let key: HubKey = (Arc::from(tenant), Arc::from(server), Arc::from(database));
        self.hubs.contains_key(&key)
    }

    fn hub(self: &Arc<Self>, key: &HubKey, spec: &ConnectSpec) -> Arc<Hub> {
        self.hubs
            .entry(key.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let id = self.next_hub.fetch_add(1, Ordering::Relaxed);
                let task = HubTask {
                    spec: spec.clone(),
                    conn: None,
                    channels: HashMap::new(),
                    gauges: self.gauge.as_ref().map(|g| Gauges {
                        connections: g.with_label_values(&[&key.0, "connections"]),
                        subscriptions: g.with_label_values(&[&key.0, "subscriptions"]),
                    }),
                };
                tokio::spawn(task.run(rx, Arc::downgrade(self), key.clone(), id));
                Arc::new(Hub { id, commands: tx })
            })
            .clone()
    }

    /// Hub `id` of `key` has ended: it goes, unless a new one already took its place.
    fn ended(&self, key: &HubKey, id: u64) {
        self.hubs.remove_if(key, |_, hub| hub.id == id);
    }
}

/// One client's subscriptions. Dropping it ends them.
pub struct Listener {
    hubs: Arc<ListenHubs>,
    key: HubKey,
    spec: ConnectSpec,
    id: u64,
    mailbox: Arc<Mailbox>,
    channels: Vec<Arc<str>>,
}

impl Listener {
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// Listens on `channel`; returns once the hub's server connection listens on it, so a
    /// NOTIFY after this returns reaches the client, as with a direct LISTEN.
    pub async fn listen(&mut self, channel: &str) -> Result<(), ErrorReport> {
        if self.channels.iter().any(|c| &**c == channel) {
            return Ok(());
        }
        let channel: Arc<str> = Arc::from(channel);
        // A hub that ended as this was sent: start a new one, once.
        for _ in 0..2 {
            let (done, answer) = oneshot::channel();
            let hub = self.hubs.hub(&self.key, &self.spec);
            let sent = hub.commands.send(Command::Listen {
                channel: channel.clone(),
                subscriber: self.id,
                mailbox: self.mailbox.clone(),
                done,
            });
            if sent.is_err() {
                self.hubs
                    .hubs
                    .remove_if(&self.key, |_, h| Arc::ptr_eq(h, &hub));
                continue;
            }
            return match answer.await {
                Ok(Ok(())) => {
                    self.channels.push(channel);
                    Ok(())
                }
                Ok(Err(report)) => Err(report),
                Err(_) => continue,
            };
        }
        Err(ErrorReport::error(
            sqlstate::CONNECTION_FAILURE,
            "LISTEN failed: pgtenant's listening connection for this database ended",
        ))
    }

    /// Stops listening on `channel` (None: on every channel).
    pub fn unlisten(&mut self, channel: Option<&str>) {
        let before = self.channels.len();
        match channel {
            Some(c) => self.channels.retain(|x| &**x != c),
            None => self.channels.clear(),
        }
        if self.channels.len() == before {
            return;
        }
        if let Some(hub) = self.hubs.hubs.get(&self.key) {
            let _ = hub.commands.send(Command::Unlisten {
                channel: channel.map(Arc::from),
                subscriber: self.id,
            });
        }
    }

    pub fn is_listening(&self) -> bool {
        !self.channels.is_empty()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.unlisten(None);
    }
}

/// The task that owns a hub's server connection.
struct HubTask {
    spec: ConnectSpec,
    conn: Option<BackendConn>,
    /// Channel → (subscriber, mailbox).
    channels: HashMap<Arc<str>, Vec<(u64, Arc<Mailbox>)>>,
    gauges: Option<Gauges>,
}

/// The tenant's series of `pgtenant_listen`.
struct Gauges {
    connections: prometheus::IntGauge,
    subscriptions: prometheus::IntGauge,
}

impl HubTask {
    /// Sets the gauges from the hub's state (after every change).
    fn count(&self) {
        if let Some(g) = &self.gauges {
            g.connections.set(i64::from(self.conn.is_some()));
            g.subscriptions
                .set(self.channels.values().map(|s| s.len() as i64).sum());
        }
    }
}

impl HubTask {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        hubs: Weak<ListenHubs>,
        key: HubKey,
        id: u64,
    ) {
        loop {
            let conn = &mut self.conn;
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(c) => self.on_command(c).await,
                    None => break,
                },
                m = async {
                    match conn.as_mut() {
                        Some(c) => c.next_message().await,
                        None => std::future::pending().await,
                    }
                } => match m {
                    Ok(m) => self.on_message(m),
                    Err(e) => self.lost(&e.to_string()),
                },
            }
            if self.channels.is_empty() {
                // Nobody listens: the connection goes, and the hub with it.
                self.conn = None;
                self.count();
                if let Some(h) = hubs.upgrade() {
                    h.ended(&key, id);
                }
                commands.close();
                // Commands sent meanwhile are answered (a Listen is retried on a new hub).
                while let Ok(c) = commands.try_recv() {
                    drop(c);
                }
                break;
            }
            self.count();
        }
    }

    async fn on_command(&mut self, c: Command) {
        match c {
            Command::Listen {
                channel,
                subscriber,
                mailbox,
                done,
            } => {
                let r = self.listen(&channel).await;
                if r.is_ok() {
                    self.channels
                        .entry(channel)
                        .or_default()
                        .push((subscriber, mailbox));
                }
                // Counted before the client hears back, so what it sees next is counted.
                self.count();
                let _ = done.send(r);
            }
            Command::Unlisten {
                channel,
                subscriber,
            } => {
                let mut emptied = Vec::new();
                for (name, subs) in self.channels.iter_mut() {
                    if channel.as_ref().is_none_or(|c| c == name) {
                        subs.retain(|(id, _)| *id != subscriber);
                        if subs.is_empty() {
                            emptied.push(name.clone());
                        }
                    }
                }
                for name in emptied {
                    self.channels.remove(&name);
                    if !self.channels.is_empty() {
                        let sql = format!("UNLISTEN {}", quote_ident(&name));
                        if let Err(e) = self.execute(&sql).await {
                            self.lost(&e);
                        }
                    }
                }
            }
        }
    }

    /// LISTEN on the hub's connection, opened first when there is none.
    async fn listen(&mut self, channel: &str) -> Result<(), ErrorReport> {
        if self.channels.contains_key(channel) {
            return Ok(());
        }
        if self.conn.is_none() {
            let mut spec = self.spec.clone();
            spec.params.retain(|(k, _)| k != "application_name");
            spec.params
                .push(("application_name".into(), HUB_APPLICATION_NAME.into()));
            self.conn = Some(BackendConn::connect(&spec).await.map_err(|e| e.report())?);
        }
        let sql = format!("LISTEN {}", quote_ident(channel));
        self.execute(&sql).await.map_err(|e| {
            ErrorReport::error(sqlstate::CONNECTION_FAILURE, format!("LISTEN failed: {e}"))
        })
    }

    /// Runs `sql` on the connection, handing out notifications that arrive meanwhile.
    async fn execute(&mut self, sql: &str) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else {
            return Err("no connection".into());
        };
        let mut out = BytesMut::new();
        crate::protocol::to_server::query(sql, &mut out).map_err(|e| e.to_string())?;
        conn.send(&out).await.map_err(|e| e.to_string())?;
        let mut failed = None;
        loop {
            let m = match self.conn.as_mut() {
                Some(c) => c.next_message().await.map_err(|e| e.to_string())?,
                None => return Err("no connection".into()),
            };
            match m {
                Message::ReadyForQuery(_) => {
                    return failed.map_or(Ok(()), Err);
                }
                Message::ErrorResponse(body) => {
                    let (_, message, _) = crate::backend::connection::error_fields(body.fields());
                    failed = Some(message);
                }
                other => self.on_message(other),
            }
        }
    }

    fn on_message(&mut self, m: Message) {
        let Message::NotificationResponse(n) = m else {
            return;
        };
        let (Ok(channel), Ok(payload)) = (n.channel(), n.message()) else {
            return;
        };
        let Some(subs) = self.channels.get(channel) else {
            return;
        };
        let message = notification(n.process_id(), channel, payload);
        for (_, mailbox) in subs {
            mailbox.post(message.clone());
        }
    }

    /// The connection is gone: every listener is told (its session ends, as a direct one
    /// would with its connection), and the hub with them.
    fn lost(&mut self, why: &str) {
        tracing::warn!(
            server = %self.spec.server.name,
            database = %self.spec.database,
            error = why,
            "the connection holding clients' LISTENs was lost"
        );
        for subs in self.channels.values() {
            for (_, mailbox) in subs {
                mailbox.lose();
            }
        }
        self.channels.clear();
        self.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_is_encoded_as_the_server_encodes_it() {
        let b = notification(7, "jobs", "run");
        let mut buf = BytesMut::from(&b[..]);
        let Ok(Some(Message::NotificationResponse(n))) = Message::parse(&mut buf) else {
            panic!("not a NotificationResponse");
        };
        assert_eq!(n.process_id(), 7);
        assert_eq!(n.channel().unwrap(), "jobs");
        assert_eq!(n.message().unwrap(), "run");
    }

    #[test]
    fn a_mailbox_hands_over_what_was_posted_in_order() {
        let m = Mailbox::default();
        m.post(notification(1, "a", "1"));
        m.post(notification(1, "a", "2"));
        let waker = futures_util::task::noop_waker();
        assert!(m.wakes(&waker));
        let mut out = BytesMut::new();
        assert!(m.drain_into(&mut out).is_ok());
        let mut expected = BytesMut::new();
        expected.extend_from_slice(&notification(1, "a", "1"));
        expected.extend_from_slice(&notification(1, "a", "2"));
        assert_eq!(out, expected);
        assert!(!m.wakes(&waker), "nothing left");
    }

    #[test]
    fn a_lost_subscription_is_told_after_what_arrived_before() {
        let m = Mailbox::default();
        m.post(notification(1, "a", "1"));
        m.lose();
        let mut out = BytesMut::new();
        assert!(m.drain_into(&mut out).is_err());
        assert_eq!(&out[..], &notification(1, "a", "1")[..]);
    }

    #[test]
    fn a_mailbox_never_holds_more_than_its_limit() {
        let m = Mailbox::default();
        for i in 0..MAILBOX_LIMIT + 5 {
            m.post(notification(1, "a", &i.to_string()));
        }
        assert_eq!(m.queue.lock().unwrap().len(), MAILBOX_LIMIT);
    }
}
