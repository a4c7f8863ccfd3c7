//! Value parsers for the examples' clap flags (included with `#[path]`): each refuses a
//! bad value with a message clap prints beside the flag's name.

/// A count of at least 1.
#[allow(dead_code)]
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A positive finite number (a learning rate).
#[allow(dead_code)]
pub fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(x) => Err(format!("must be a positive finite number, got {x}")),
        Err(e) => Err(e.to_string()),
    }
}
