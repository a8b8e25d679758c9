//! Small command-line value parsers shared by both daemons.

use std::time::Duration;

/// Parses a positive number of seconds, fractions allowed (`0.5`, `10`).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}
