//! Value parsers for command-line options that have a valid range. clap runs them while
//! parsing, so a bad value is refused before any data is loaded or any work is done, and
//! the message gives the allowed range.

fn num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .map_err(|_| format!("'{s}' is not a number"))
}

fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = num(s)?;
    if !v.is_finite() {
        return Err(format!("{v} is not a finite number"));
    }
    Ok(v)
}

/// A rate or scale that must be > 0 (learning rate).
pub fn positive(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v <= 0.0 {
        return Err(format!("{v} is out of range: must be > 0"));
    }
    Ok(v)
}

/// A coefficient that must be ≥ 0 (weight decay).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v < 0.0 {
        return Err(format!("{v} is out of range: must be >= 0"));
    }
    Ok(v)
}

/// In `[0, 1)`: momentum, label smoothing, removal ratios.
pub fn unit_half_open(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!("{v} is out of range: must be in [0, 1)"));
    }
    Ok(v)
}

/// In `[0, 1]`: a mixing weight (distillation).
pub fn unit_closed(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is out of range: must be in [0, 1]"));
    }
    Ok(v)
}

/// In `(0, 1]`: a fraction of the dense cost to keep.
pub fn keep_fraction(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!(
            "{v} is out of range: must be in (0, 1] (a fraction kept)"
        ));
    }
    Ok(v)
}

/// In `(0, 1)`: a held-out fraction.
pub fn unit_open(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if !(v > 0.0 && v < 1.0) {
        return Err(format!("{v} is out of range: must be in (0, 1)"));
    }
    Ok(v)
}

/// A count that must be ≥ 1 (epochs of a method that needs them, batch size, steps).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: i128 = num(s)?;
    if v < 1 {
        return Err(format!("{v} is out of range: must be >= 1"));
    }
    usize::try_from(v).map_err(|_| format!("{v} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(positive("0").is_err() && positive("-1").is_err() && positive("1e-3").is_ok());
        assert!(positive("nan").is_err() && positive("inf").is_err());
        assert!(non_negative("-0.1").is_err() && non_negative("0").is_ok());
        assert!(unit_half_open("1").is_err() && unit_half_open("-0.1").is_err());
        assert!(unit_half_open("0.9").is_ok());
        assert!(unit_closed("1").is_ok() && unit_closed("1.5").is_err());
        assert!(keep_fraction("0").is_err() && keep_fraction("1").is_ok());
        assert!(at_least_one("0").is_err() && at_least_one("3").is_ok());
        assert!(positive("abc").unwrap_err().contains("not a number"));
    }
}
