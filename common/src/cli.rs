//! Small command-line value parsers shared by both daemons.

use std::time::Duration;

/// Parses a positive number of seconds, fractions allowed (`0.5`, `10`).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>().map(Duration::try_from_secs_f64) {
        Ok(Ok(d)) if !d.is_zero() => Ok(d),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "soon", "inf", "NaN", "1e20"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }
}
