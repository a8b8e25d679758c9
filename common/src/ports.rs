//! Port lists such as `80,443,8000-8100`.

use std::ops::RangeInclusive;
use std::str::FromStr;

/// A set of TCP ports, written as a comma-separated list of ports and inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

/// Why a port list could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// A part was not a port number from 1 to 65535.
    #[error("{0:?} is not a port from 1 to 65535")]
    Port(String),
    /// A range ran backwards.
    #[error("range {0:?} runs backwards")]
    Backwards(String),
    /// The list was empty.
    #[error("empty port list")]
    Empty,
}

/// Parses one port from 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, PortError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(PortError::Port(s.into())),
    }
}

/// Parses `N` or `A-B` into an inclusive range.
pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, PortError> {
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (parse_port(lo)?, parse_port(hi)?),
        None => {
            let p = parse_port(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(PortError::Backwards(s.into()));
    }
    Ok(lo..=hi)
}

impl PortSet {
    /// Every port.
    pub fn all() -> Self {
        PortSet(vec![1..=u16::MAX])
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }

    /// How many ports the set holds (a narrower set is more specific).
    pub fn len(&self) -> u32 {
        self.0
            .iter()
            .map(|r| u32::from(*r.end()) - u32::from(*r.start()) + 1)
            .sum()
    }

    /// The lowest port both sets hold, if any.
    pub fn common(&self, other: &PortSet) -> Option<u16> {
        self.0
            .iter()
            .flat_map(|a| other.0.iter().map(move |b| (a, b)))
            .filter_map(|(a, b)| {
                let lo = *a.start().max(b.start());
                (lo <= *a.end().min(b.end())).then_some(lo)
            })
            .min()
    }

    /// The ranges, as given.
    pub fn ranges(&self) -> &[RangeInclusive<u16>] {
        &self.0
    }

    /// Whether the set is empty (it never is once parsed).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for PortSet {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ranges = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(parse_range)
            .collect::<Result<Vec<_>, _>>()?;
        if ranges.is_empty() {
            return Err(PortError::Empty);
        }
        Ok(PortSet(ranges))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges() {
        let s: PortSet = "80,443,8000-8100".parse().unwrap();
        assert!(s.contains(80) && s.contains(8050) && s.contains(8100));
        assert!(!s.contains(81) && !s.contains(8101));
        assert_eq!(s.len(), 103);
        assert!(PortSet::all().contains(65535));
        assert_eq!("".parse::<PortSet>(), Err(PortError::Empty));
        assert!(matches!("0".parse::<PortSet>(), Err(PortError::Port(_))));
        assert!(matches!(
            "70000".parse::<PortSet>(),
            Err(PortError::Port(_))
        ));
        assert!(matches!(
            "90-80".parse::<PortSet>(),
            Err(PortError::Backwards(_))
        ));
        assert!(matches!("a".parse::<PortSet>(), Err(PortError::Port(_))));
        let t: PortSet = "1-79,8100,9000".parse().unwrap();
        assert_eq!(s.common(&t), Some(8100));
        assert_eq!(t.common(&"81-90".parse().unwrap()), None);
    }
}
