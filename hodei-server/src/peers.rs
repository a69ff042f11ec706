//! The listeners of the other control planes sharing this one's database, handed to this one's
//! workers after its own: an agent whose control plane is gone opens its next session with
//! another (see the agent's address lists).

use std::fmt;
use std::net::SocketAddr;
#[cfg(feature = "postgres")]
use std::sync::Arc;

/// Where a control plane's agents register and open their sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    /// The registration listener.
    pub registration: SocketAddr,
    /// The mutual-TLS session listener.
    pub session: SocketAddr,
}

/// The other live control planes' listeners, as workers can reach them.
pub trait PeerListeners: Send + Sync + fmt::Debug {
    /// Every other live control plane's listeners. Blocks; an error is logged and lists none,
    /// since a worker can do with its own control plane's.
    fn peers(&self) -> Vec<Listeners>;
}

/// The agent's address lists: `own` first, then `peers`, each `IP:PORT,IP:PORT,...`.
pub(crate) fn address_lists(own: Listeners, peers: &[Listeners]) -> (String, String) {
    let all = || std::iter::once(own).chain(peers.iter().copied());
    let join = |addresses: Vec<String>| addresses.join(",");
    (
        join(all().map(|l| l.registration.to_string()).collect()),
        join(all().map(|l| l.session.to_string()).collect()),
    )
}

/// The control planes' listeners in the database they share (`hodei_listeners`): each
/// announces its own at start and withdraws them at shutdown; a control plane whose engine's
/// lease has lapsed (it died) is not listed.
#[cfg(feature = "postgres")]
#[derive(Debug)]
pub struct SharedListeners {
    store: Arc<hodei_core::PostgresStore>,
}

#[cfg(feature = "postgres")]
impl SharedListeners {
    /// The listeners of the control planes on the database of `store`; this one is the
    /// store's engine.
    pub fn new(store: Arc<hodei_core::PostgresStore>) -> Self {
        Self { store }
    }

    /// Records this control plane's listeners, replacing what an earlier life recorded.
    pub fn announce(&self, own: Listeners) -> Result<(), hodei_core::Error> {
        self.store.run_statement(
            "announcing the control plane's listeners",
            "INSERT INTO hodei_listeners (member, registration, session) VALUES ($1, $2, $3)
             ON CONFLICT (member) DO UPDATE SET registration = EXCLUDED.registration, session = EXCLUDED.session",
            vec![
                Box::new(self.store.engine_id().to_owned()),
                Box::new(own.registration.to_string()),
                Box::new(own.session.to_string()),
            ],
        )?;
        Ok(())
    }

    /// Removes this control plane's listeners: it is stopping.
    pub fn withdraw(&self) -> Result<(), hodei_core::Error> {
        self.store.run_statement(
            "withdrawing the control plane's listeners",
            "DELETE FROM hodei_listeners WHERE member = $1",
            vec![Box::new(self.store.engine_id().to_owned())],
        )?;
        Ok(())
    }

    fn listed(&self) -> Result<Vec<Listeners>, String> {
        let rows = self
            .store
            .run_statement(
                "reading the other control planes' listeners",
                "SELECT l.registration, l.session FROM hodei_listeners l
                 JOIN hodei_engines e ON e.id = l.member
                 WHERE l.member <> $1 AND e.lease_until > now()
                 ORDER BY l.member",
                vec![Box::new(self.store.engine_id().to_owned())],
            )
            .map_err(|e| e.to_string())?;
        rows.iter()
            .map(|row| {
                let (registration, session): (String, String) = (row.get(0), row.get(1));
                let parse = |text: &str| text.parse::<SocketAddr>().map_err(|e| format!("`{text}`: {e}"));
                Ok(Listeners { registration: parse(&registration)?, session: parse(&session)? })
            })
            .collect()
    }
}

#[cfg(feature = "postgres")]
impl PeerListeners for SharedListeners {
    fn peers(&self) -> Vec<Listeners> {
        self.listed().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the other control planes' listeners are unknown: workers get this one's only");
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_listeners_come_first() {
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let own = Listeners { registration: at(1), session: at(2) };
        assert_eq!(address_lists(own, &[]), ("127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()));
        let peers = [
            Listeners { registration: at(3), session: at(4) },
            Listeners { registration: at(5), session: at(6) },
        ];
        assert_eq!(
            address_lists(own, &peers),
            (
                "127.0.0.1:1,127.0.0.1:3,127.0.0.1:5".to_owned(),
                "127.0.0.1:2,127.0.0.1:4,127.0.0.1:6".to_owned()
            )
        );
    }
}
