//! `--publish [IP:]HOST_PORT[:ENCLAVE_PORT]` specs, Docker `-p` style.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use common::ports::{parse_range, PortError};

/// One published mapping: listen on each `(bind, host port)` and forward to the matching enclave
/// port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The address to listen on (default 0.0.0.0).
    pub bind: IpAddr,
    /// First host port.
    pub host_start: u16,
    /// First enclave port; the ranges have equal length.
    pub enclave_start: u16,
    /// How many ports the mapping covers.
    pub count: u16,
}

/// Why a publish spec could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// A port or range was invalid.
    #[error("{spec:?}: {source}")]
    Port {
        /// The whole spec.
        spec: String,
        /// What was wrong with the port part.
        #[source]
        source: PortError,
    },
    /// The IP part was not an address.
    #[error("{0:?}: the bind address is not an IP address")]
    Addr(String),
    /// Host and enclave ranges differ in length.
    #[error("{0:?}: host and enclave port ranges must have the same length")]
    Length(String),
    /// Too many parts.
    #[error("{0:?} is not [IP:]HOST_PORT[:ENCLAVE_PORT]")]
    Shape(String),
}

impl Publish {
    /// Each `(listen address, enclave port)` pair of this mapping.
    pub fn pairs(&self) -> impl Iterator<Item = (SocketAddr, u16)> + '_ {
        (0..self.count).map(|i| {
            (
                SocketAddr::new(self.bind, self.host_start + i),
                self.enclave_start + i,
            )
        })
    }
}

impl Publish {
    /// Whether this mapping and `other` listen on a common host port of a common address
    /// (0.0.0.0 or :: covers every address of its family).
    pub fn overlaps(&self, other: &Publish) -> bool {
        let same_addr = self.bind == other.bind
            || (self.bind.is_ipv4() == other.bind.is_ipv4()
                && (self.bind.is_unspecified() || other.bind.is_unspecified()));
        let end = |p: &Publish| u32::from(p.host_start) + u32::from(p.count);
        same_addr
            && u32::from(self.host_start) < end(other)
            && u32::from(other.host_start) < end(self)
    }
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = |start: u16| {
            if self.count == 1 {
                start.to_string()
            } else {
                format!("{start}-{}", u32::from(start) + u32::from(self.count) - 1)
            }
        };
        match self.bind {
            IpAddr::V4(ip) if ip.is_unspecified() => {}
            IpAddr::V4(ip) => write!(f, "{ip}:")?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:")?,
        }
        write!(
            f,
            "{}:{}",
            range(self.host_start),
            range(self.enclave_start)
        )
    }
}

impl FromStr for Publish {
    type Err = PublishError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let port_err = |source| PublishError::Port {
            spec: spec.into(),
            source,
        };
        let (bind, rest) = if let Some(r) = spec.strip_prefix('[') {
            let (ip, rest) = r
                .split_once("]:")
                .ok_or_else(|| PublishError::Shape(spec.into()))?;
            let ip = ip.parse().map_err(|_| PublishError::Addr(spec.into()))?;
            (ip, rest)
        } else {
            match spec.split_once(':') {
                Some((ip, rest)) if ip.contains('.') => (
                    ip.parse().map_err(|_| PublishError::Addr(spec.into()))?,
                    rest,
                ),
                _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), spec),
            }
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let (host, enclave) = match parts.as_slice() {
            [h] => (parse_range(h).map_err(port_err)?, None),
            [h, e] => (
                parse_range(h).map_err(port_err)?,
                Some(parse_range(e).map_err(port_err)?),
            ),
            _ => return Err(PublishError::Shape(spec.into())),
        };
        let enclave = enclave.unwrap_or_else(|| host.clone());
        if host.end() - host.start() != enclave.end() - enclave.start() {
            return Err(PublishError::Length(spec.into()));
        }
        Ok(Publish {
            bind,
            host_start: *host.start(),
            enclave_start: *enclave.start(),
            count: host.end() - host.start() + 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_and_display() {
        let p = |s: &str| s.parse::<Publish>().unwrap();
        assert!(p("8080:80").overlaps(&p("8080:81")));
        assert!(p("8000-8010:100-110").overlaps(&p("8010:80")));
        assert!(!p("8000-8010:100-110").overlaps(&p("8011:80")));
        assert!(
            p("10.0.0.1:80").overlaps(&p("80")),
            "0.0.0.0 covers every IPv4 address"
        );
        assert!(!p("10.0.0.1:80").overlaps(&p("10.0.0.2:80")));
        assert!(!p("[::1]:80").overlaps(&p("80")), "another family");
        for spec in ["8080:80", "10.0.0.1:8000-8010:100-110", "[::1]:53:53"] {
            assert_eq!(p(spec).to_string(), spec);
        }
    }

    fn pairs(s: &str) -> Vec<(SocketAddr, u16)> {
        s.parse::<Publish>().unwrap().pairs().collect()
    }

    #[test]
    fn docker_style_specs() {
        assert_eq!(
            pairs("18080:8080"),
            vec![("0.0.0.0:18080".parse().unwrap(), 8080)]
        );
        assert_eq!(pairs("8080"), vec![("0.0.0.0:8080".parse().unwrap(), 8080)]);
        assert_eq!(
            pairs("127.0.0.1:18080:80"),
            vec![("127.0.0.1:18080".parse().unwrap(), 80)]
        );
        assert_eq!(
            pairs("10.0.0.1:443"),
            vec![("10.0.0.1:443".parse().unwrap(), 443)]
        );
        assert_eq!(
            pairs("[::1]:8443:443"),
            vec![("[::1]:8443".parse().unwrap(), 443)]
        );
        let r = pairs("9000-9010:7000-7010");
        assert_eq!(r.len(), 11);
        assert_eq!(r[10], ("0.0.0.0:9010".parse().unwrap(), 7010));
    }

    #[test]
    fn bad_specs_say_why() {
        assert!(matches!(
            "9000-9010:7000-7005".parse::<Publish>(),
            Err(PublishError::Length(_))
        ));
        assert!(matches!(
            "1:2:3:4".parse::<Publish>(),
            Err(PublishError::Shape(_))
        ));
        assert!(matches!(
            "1.2.3:80".parse::<Publish>(),
            Err(PublishError::Addr(_))
        ));
        assert!(matches!(
            "0:80".parse::<Publish>(),
            Err(PublishError::Port { .. })
        ));
        assert!(matches!(
            "x".parse::<Publish>(),
            Err(PublishError::Port { .. })
        ));
    }
}
