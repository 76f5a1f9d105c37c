//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does it: one Lease object names the holder; the holder renews it every TTL/3, each write
//! carrying the resourceVersion it last wrote (a 409 Conflict means someone else wrote it: the
//! lead is lost); another replica takes the Lease only when it is released (no holder) or when
//! it has seen no change to it for a whole TTL by its own clock (so clock skew between machines
//! does not matter). The leader steps down a margin (TTL/4) before its Lease could expire,
//! counting from when its last successful renewal was *sent*, as the etcd leader does.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease {name:?} in namespace {namespace:?}: {source}")]
    Api { namespace: String, name: String, source: kube::Error },
}

/// One replica's side of an election on one Lease.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    id: String,
    ttl: Duration,
}

/// A term as leader. `lost` turns true when the term ended (renewal refused, or not confirmed
/// in time); the holder must stop acting as leader at once.
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

/// What the renewer knows of its own Lease.
struct Held {
    lease: Lease,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl LeaderElector {
    /// An elector for the Lease `name` in `namespace`; `id` names this replica (holderIdentity).
    pub fn new(client: kube::Client, namespace: &str, name: &str, id: &str, ttl: Duration) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            id: id.into(),
            ttl,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Before the Lease could expire, the leader steps down this long ahead.
    fn margin(&self) -> Duration {
        self.ttl / 4
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError::Api { namespace: self.namespace.clone(), name: self.name.clone(), source }
    }

    fn spec_for_us(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let stamp = now();
        let same_holder = previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.id.as_str());
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.id.clone()),
            lease_duration_seconds: Some(self.ttl.as_secs().max(1) as i32),
            acquire_time: if same_holder { previous.and_then(|p| p.acquire_time.clone()) } else { Some(stamp.clone()) },
            renew_time: Some(stamp),
            lease_transitions: Some(if previous.is_some() && !same_holder { transitions + 1 } else { transitions }),
            ..Default::default()
        }
    }

    /// Campaigns until this replica holds the Lease. API errors are retried (logged); the
    /// Lease is polled every TTL/3 while another replica holds it.
    pub async fn campaign(&self) -> Leadership {
        // The Lease as last seen, and when (by this clock) it last changed.
        let mut observed: Option<(String, Instant)> = None;
        loop {
            match self.try_acquire(&mut observed).await {
                Ok(Some(held)) => return self.lead(held),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "reading or taking the leader lease failed; retrying"),
            }
            tokio::time::sleep(self.ttl / 3).await;
        }
    }

    /// One look at the Lease: creates it when absent, takes it when released or expired.
    async fn try_acquire(&self, observed: &mut Option<(String, Instant)>) -> Result<Option<Held>, LeaseError> {
        let current = self.api.get_opt(&self.name).await.map_err(|e| self.err(e))?;
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec_for_us(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(lease) => {
                    tracing::info!(id = %self.id, lease = %self.name, "created the leader lease");
                    Ok(Some(Held { lease }))
                }
                Err(e) if is_conflict(&e) => Ok(None),
                Err(e) => Err(self.err(e)),
            };
        };
        let rv = current.metadata.resource_version.clone().unwrap_or_default();
        let seen_at = match observed {
            Some((old, at)) if *old == rv => *at,
            _ => {
                let at = Instant::now();
                *observed = Some((rv.clone(), at));
                at
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let duration = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map_or(self.ttl, |s| Duration::from_secs(s as u64));
        let free = match holder {
            None => true,
            // This replica held it before a restart: nobody else can be leading on it.
            Some(h) if h == self.id => true,
            Some(_) => seen_at.elapsed() >= duration,
        };
        if !free {
            return Ok(None);
        }
        let mut lease = current.clone();
        lease.spec = Some(self.spec_for_us(Some(&spec)));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(lease) => {
                tracing::info!(id = %self.id, previous = ?holder, lease = %self.name, "took the leader lease");
                Ok(Some(Held { lease }))
            }
            // Someone else renewed or took it since the read.
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    fn lead(&self, held: Held) -> Leadership {
        let (lost_tx, lost) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        // Acquisition was sent before `now`: counting from here is later than the truth, so
        // subtract nothing but keep the margin.
        let sent = Instant::now();
        let renewer = tokio::spawn(self.clone().renew(held, sent, lost_tx, stop_rx));
        Leadership { lost, stop, renewer }
    }

    /// Renews every TTL/3 until stopped or lost; on stop, releases the Lease.
    async fn renew(self, mut held: Held, acquired_sent: Instant, lost: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut last_sent = acquired_sent;
        let mut next = Instant::now() + self.ttl / 3;
        loop {
            let deadline = last_sent + self.ttl - self.margin();
            tokio::select! {
                _ = tokio::time::sleep_until(next.min(deadline)) => {}
                _ = stop.changed() => {
                    self.release(&held).await;
                    return;
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(id = %self.id, lease = %self.name, "leader lease not renewed in time; stepping down");
                let _ = lost.send(true);
                return;
            }
            let sent = Instant::now();
            let mut lease = held.lease.clone();
            lease.spec = Some(self.spec_for_us(held.lease.spec.as_ref()));
            let attempt = tokio::time::timeout_at(deadline, self.api.replace(&self.name, &PostParams::default(), &lease)).await;
            match attempt {
                Ok(Ok(lease)) => {
                    held.lease = lease;
                    last_sent = sent;
                    next = sent + self.ttl / 3;
                }
                Ok(Err(e)) if is_conflict(&e) || is_not_found(&e) => {
                    tracing::warn!(id = %self.id, lease = %self.name, error = %e, "leader lease taken or removed by another writer; stepping down");
                    let _ = lost.send(true);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(id = %self.id, error = %e, "renewing the leader lease failed; retrying");
                    next = Instant::now() + (self.ttl / 10).max(Duration::from_millis(50));
                }
                Err(_) => next = Instant::now(),
            }
        }
    }

    /// Clears holderIdentity so another replica takes over at once (best effort: on failure the
    /// Lease simply expires).
    async fn release(&self, held: &Held) {
        let mut lease = held.lease.clone();
        let mut spec = lease.spec.clone().unwrap_or_default();
        spec.holder_identity = None;
        spec.renew_time = Some(now());
        // A short duration: a replica that reads the released Lease takes it on sight anyway.
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        let attempt = tokio::time::timeout(self.ttl / 2, self.api.replace(&self.name, &PostParams::default(), &lease)).await;
        match attempt {
            Ok(Ok(_)) => tracing::info!(id = %self.id, lease = %self.name, "released the leader lease"),
            Ok(Err(e)) => tracing::warn!(id = %self.id, error = %e, "releasing the leader lease failed; it expires by itself"),
            Err(_) => tracing::warn!(id = %self.id, "releasing the leader lease timed out; it expires by itself"),
        }
    }
}

impl Leadership {
    /// Ends the term: stops renewing and releases the Lease (holderIdentity cleared), so another
    /// replica takes over at once. The caller must already have stopped acting as leader.
    pub async fn resign(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.renewer).await;
    }

    /// Whether the term still holds, by this replica's own view.
    pub fn leading(&self) -> bool {
        !*self.lost.borrow()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Dropped without resign: stop renewing (the Lease then expires by itself).
        if !self.renewer.is_finished() && !*self.stop.borrow() {
            self.renewer.abort();
        }
    }
}
