//! Who is where: the addresses of branches, for peers (Raft traffic) and for customers (the
//! replay). Three sources: a static `id=host:port` list, a template with `{id}` / `{ordinal}`
//! placeholders (a StatefulSet's stable DNS names), and the StatefulSet ordinal of this pod.

use std::collections::BTreeMap;

/// Errors in address configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoveryError {
    #[error("peer list entry {entry:?}: expected ID=HOST:PORT")]
    BadPeerEntry { entry: String },
    #[error("peer list names branch {0} twice")]
    DuplicatePeer(u64),
    #[error("address template {template:?} has no {{id}} or {{ordinal}} placeholder")]
    TemplateWithoutPlaceholder { template: String },
    #[error("branch {id} is below the id offset {offset}, so it has no ordinal")]
    NoOrdinal { id: u64, offset: u64 },
    #[error("no address for branch {0}")]
    Unknown(u64),
    #[error("address {address:?} of branch {id}: expected [http(s)://]HOST:PORT with a port from 1 to 65535")]
    BadAddress { id: u64, address: String },
    #[error("cannot take a branch id from pod name {name:?}: expected NAME-ORDINAL (a StatefulSet pod)")]
    NoOrdinalInName { name: String },
}

/// Maps a branch id to an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addresses {
    Static(BTreeMap<u64, String>),
    /// `{id}` is replaced by the branch id, `{ordinal}` by `id - offset`.
    Template {
        template: String,
        offset: u64,
    },
}

impl Addresses {
    /// Parses `1=host:port,2=host:port`.
    pub fn parse_list(list: &str) -> Result<Addresses, DiscoveryError> {
        let mut map = BTreeMap::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || DiscoveryError::BadPeerEntry {
                entry: entry.to_string(),
            };
            let (id, addr) = entry.split_once('=').ok_or_else(bad)?;
            let id: u64 = id.trim().parse().map_err(|_| bad())?;
            let addr = addr.trim();
            if addr.is_empty() {
                return Err(bad());
            }
            check_address(id, addr)?;
            if map.insert(id, addr.to_string()).is_some() {
                return Err(DiscoveryError::DuplicatePeer(id));
            }
        }
        Ok(Addresses::Static(map))
    }

    pub fn template(template: &str, offset: u64) -> Result<Addresses, DiscoveryError> {
        if !template.contains("{id}") && !template.contains("{ordinal}") {
            return Err(DiscoveryError::TemplateWithoutPlaceholder {
                template: template.to_string(),
            });
        }
        Ok(Addresses::Template {
            template: template.to_string(),
            offset,
        })
    }

    /// The address of branch `id`.
    pub fn address(&self, id: u64) -> Result<String, DiscoveryError> {
        match self {
            Addresses::Static(map) => map.get(&id).cloned().ok_or(DiscoveryError::Unknown(id)),
            Addresses::Template { template, offset } => {
                let mut address = template.replace("{id}", &id.to_string());
                if address.contains("{ordinal}") {
                    let ordinal = id
                        .checked_sub(*offset)
                        .ok_or(DiscoveryError::NoOrdinal { id, offset: *offset })?;
                    address = address.replace("{ordinal}", &ordinal.to_string());
                }
                check_address(id, &address)?;
                Ok(address)
            }
        }
    }

    /// Addresses for every id in `ids`.
    pub fn resolve_all(&self, ids: &[u64]) -> Result<BTreeMap<u64, String>, DiscoveryError> {
        ids.iter().map(|id| Ok((*id, self.address(*id)?))).collect()
    }
}

/// Refuses what no connection could reach: `HOST:PORT`, optionally behind `http://` or
/// `https://`, with a port from 1 to 65535 (a template such as `127.0.0.1:5005{id}` runs past
/// it from branch 10 on).
fn check_address(id: u64, address: &str) -> Result<(), DiscoveryError> {
    let bad = || DiscoveryError::BadAddress {
        id,
        address: address.to_string(),
    };
    let rest = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(port) if port > 0 && !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

/// The StatefulSet ordinal at the end of a pod name (`distbank-7` → 7).
pub fn ordinal_from_pod_name(name: &str) -> Result<u64, DiscoveryError> {
    let bad = || DiscoveryError::NoOrdinalInName { name: name.to_string() };
    let (prefix, ordinal) = name.trim().rsplit_once('-').ok_or_else(bad)?;
    if prefix.is_empty() || ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    ordinal.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_list() {
        let addresses = Addresses::parse_list("1=a:1, 2=b:2").expect("parses");
        assert_eq!(addresses.address(2), Ok("b:2".to_string()));
        assert_eq!(addresses.address(3), Err(DiscoveryError::Unknown(3)));
        assert!(matches!(
            Addresses::parse_list("1=a:1,1=b:2"),
            Err(DiscoveryError::DuplicatePeer(1))
        ));
        assert!(matches!(
            Addresses::parse_list("x=a:1"),
            Err(DiscoveryError::BadPeerEntry { .. })
        ));
        assert!(matches!(
            Addresses::parse_list("1="),
            Err(DiscoveryError::BadPeerEntry { .. })
        ));
    }

    #[test]
    fn templates() {
        let by_ordinal = Addresses::template("db-{ordinal}.db-headless.ns.svc.cluster.local:50052", 1).expect("ok");
        assert_eq!(
            by_ordinal.address(1).as_deref(),
            Ok("db-0.db-headless.ns.svc.cluster.local:50052")
        );
        assert_eq!(
            by_ordinal.address(0),
            Err(DiscoveryError::NoOrdinal { id: 0, offset: 1 })
        );
        let by_id = Addresses::template("http://127.0.0.1:{id}", 0).expect("ok");
        assert_eq!(by_id.address(50051).as_deref(), Ok("http://127.0.0.1:50051"));
        assert!(Addresses::template("http://x:1", 1).is_err());
    }

    #[test]
    fn addresses_no_connection_could_reach_are_refused() {
        for good in [
            "a:1",
            "http://a:50051",
            "https://a.b.svc:443/",
            "[::1]:50051",
            "10.0.0.1:65535",
        ] {
            assert!(Addresses::parse_list(&format!("1={good}")).is_ok(), "{good}");
        }
        for bad in ["a", "a:0", "a:99999", "a:port", ":50051", "http://a"] {
            assert_eq!(
                Addresses::parse_list(&format!("1={bad}")),
                Err(DiscoveryError::BadAddress {
                    id: 1,
                    address: bad.to_string()
                }),
                "{bad}"
            );
        }
        // A template that runs past the port range from branch 10 on.
        let template = Addresses::template("127.0.0.1:5005{id}", 0).expect("ok");
        assert!(template.address(9).is_ok());
        assert!(matches!(
            template.address(10),
            Err(DiscoveryError::BadAddress { id: 10, .. })
        ));
    }

    #[test]
    fn pod_ordinals() {
        assert_eq!(ordinal_from_pod_name("distbank-0"), Ok(0));
        assert_eq!(ordinal_from_pod_name("my-bank-distbank-12"), Ok(12));
        for bad in [
            "distbank",
            "distbank-",
            "-3",
            "distbank-x1",
            "distbank-99999999999999999999999",
        ] {
            assert!(ordinal_from_pod_name(bad).is_err(), "{bad}");
        }
    }
}
