//! Fair sharing: what one workload may hold of the agent at once, so a noisy one cannot starve
//! the others (docs/reliability.md).
//!
//! - Outbound, per local workload: its concurrent connections ([`Limit`]) and the HBONE TLS
//!   handshakes its connections wait on (a semaphore: they queue, within the connect timeout).
//! - Inbound, per calling workload (the peer's IP, which is the source workload's own: HBONE
//!   connections are opened from its namespace): concurrent connections and TLS handshakes in
//!   progress ([`PerPeer`]).
//!
//! A connection over a limit is refused at once (a reset, or HTTP 503 on an HBONE stream),
//! recorded with `response_flags` `UO` as Envoy records a circuit breaker's overflow. Taking
//! and giving back a permit is an atomic add, plus one lock of one shard of sixteen for
//! [`PerPeer`]: no global lock on the data path.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

/// A cap on what one workload holds at once.
#[derive(Debug)]
pub struct Limit {
    held: AtomicUsize,
    max: usize,
}

/// One unit of a [`Limit`], given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<Limit>,
    /// Set for a [`PerPeer`] limit, whose entry goes when its last permit does.
    entry: Option<(Weak<PerPeer>, IpAddr)>,
}

impl Limit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            max,
        })
    }

    /// A permit, unless `max` are held already.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.take().then(|| Permit {
            limit: self.clone(),
            entry: None,
        })
    }

    fn take(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.max).then_some(held + 1)
            })
            .is_ok()
    }

    /// Permits held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

const SHARDS: usize = 16;

/// A [`Limit`] for each peer IP, created on first use and removed with its last permit, so the
/// table holds only peers that hold something.
#[derive(Debug)]
pub struct PerPeer {
    shards: [Mutex<HashMap<IpAddr, Arc<Limit>>>; SHARDS],
    max: usize,
}

impl PerPeer {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            max,
        })
    }

    /// A permit for `peer`, unless it holds `max` already.
    pub fn try_acquire(self: &Arc<Self>, peer: IpAddr) -> Option<Permit> {
        let peer = peer.to_canonical();
        let mut shard = lock(self.shard(peer));
        let limit = shard.entry(peer).or_insert_with(|| Limit::new(self.max));
        if !limit.take() {
            return None;
        }
        Some(Permit {
            limit: limit.clone(),
            entry: Some((Arc::downgrade(self), peer)),
        })
    }

    /// What `peer` holds now.
    pub fn held(&self, peer: IpAddr) -> usize {
        let peer = peer.to_canonical();
        lock(self.shard(peer)).get(&peer).map_or(0, |l| l.held())
    }

    /// What each peer may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Peers that hold something.
    pub fn peers(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn shard(&self, peer: IpAddr) -> &Mutex<HashMap<IpAddr, Arc<Limit>>> {
        let hash = match peer {
            IpAddr::V4(ip) => u32::from(ip) as usize,
            IpAddr::V6(ip) => u128::from(ip) as usize,
        };
        &self.shards[hash % SHARDS]
    }

    /// Gives `peer`'s permit back under its shard's lock, where permits are taken too, so an
    /// entry is removed only when nothing holds it.
    fn release(&self, peer: IpAddr, limit: &Limit) {
        let mut shard = lock(self.shard(peer));
        if limit.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            shard.remove(&peer);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.entry.take() {
            Some((table, peer)) => match table.upgrade() {
                Some(table) => table.release(peer, &self.limit),
                None => {
                    self.limit.held.fetch_sub(1, Ordering::AcqRel);
                }
            },
            None => {
                self.limit.held.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The agent's limits, from the `limits` settings; read at start.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent connections from one local workload.
    pub connections_per_workload: usize,
    /// HBONE handshakes one local workload's connections may wait on at once.
    pub handshakes_per_workload: usize,
    /// Inbound connections per calling workload (peer IP), across this node's workloads.
    pub inbound_connections: Arc<PerPeer>,
    /// Inbound TLS handshakes in progress per peer IP.
    pub inbound_handshakes: Arc<PerPeer>,
}

impl Limits {
    pub fn new(config: &crate::workload::LimitsConfig) -> Self {
        Self {
            connections_per_workload: config.connections_per_workload,
            handshakes_per_workload: config.handshakes_per_workload,
            inbound_connections: PerPeer::new(config.connections_per_workload),
            inbound_handshakes: PerPeer::new(config.handshakes_per_workload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_beyond_its_max_and_takes_back_what_is_dropped() {
        let limit = Limit::new(2);
        let (a, b) = (limit.try_acquire(), limit.try_acquire());
        assert!(a.is_some() && b.is_some());
        assert!(limit.try_acquire().is_none(), "a third is over the limit");
        drop(a);
        assert_eq!(limit.held(), 1);
        assert!(
            limit.try_acquire().is_some(),
            "room again once one is dropped"
        );
    }

    #[test]
    fn peers_are_limited_each_on_their_own_and_forgotten_when_done() {
        let table = PerPeer::new(1);
        let noisy: IpAddr = "10.1.0.2".parse().unwrap();
        let other: IpAddr = "10.1.0.3".parse().unwrap();
        let held = table.try_acquire(noisy).expect("first");
        assert!(table.try_acquire(noisy).is_none(), "noisy is at its limit");
        let mapped: IpAddr = "::ffff:10.1.0.2".parse().unwrap();
        assert!(
            table.try_acquire(mapped).is_none(),
            "the IPv4-mapped form is the same peer"
        );
        let theirs = table
            .try_acquire(other)
            .expect("another peer is not affected");
        assert_eq!((table.held(noisy), table.peers()), (1, 2));
        drop((held, theirs));
        assert_eq!(table.peers(), 0, "entries go with their last permit");
        assert!(table.try_acquire(noisy).is_some());
    }

    #[test]
    fn permits_from_many_threads_never_exceed_the_limit_and_all_come_back() {
        let table = PerPeer::new(8);
        let peer: IpAddr = "10.1.0.9".parse().unwrap();
        let most = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (table, most) = (table.clone(), most.clone());
                s.spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(permit) = table.try_acquire(peer) {
                            most.fetch_max(table.held(peer), Ordering::Relaxed);
                            drop(permit);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::Relaxed) <= 8);
        assert_eq!((table.held(peer), table.peers()), (0, 0));
    }
}
