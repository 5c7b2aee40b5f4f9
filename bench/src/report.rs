//! Result rows and the markdown tables they print as.

use std::fmt::Write as _;

/// One line of a result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub measurement: String,
    pub rig: String,
    pub baselines: String,
    /// The ratio against the baseline, or the latency rig adds.
    pub ratio: String,
    pub target: String,
    /// `None` when the row is informational (no target).
    pub met: Option<bool>,
}

impl Row {
    pub fn new(measurement: impl Into<String>) -> Row {
        Row {
            measurement: measurement.into(),
            rig: String::new(),
            baselines: String::new(),
            ratio: String::new(),
            target: String::new(),
            met: None,
        }
    }

    pub fn rig(mut self, v: impl Into<String>) -> Row {
        self.rig = v.into();
        self
    }

    pub fn baselines(mut self, v: impl Into<String>) -> Row {
        self.baselines = v.into();
        self
    }

    pub fn ratio(mut self, v: impl Into<String>) -> Row {
        self.ratio = v.into();
        self
    }

    pub fn target(mut self, v: impl Into<String>, met: bool) -> Row {
        self.target = v.into();
        self.met = Some(met);
        self
    }

    /// A row for a measurement that could not run, with the reason.
    pub fn failed(measurement: impl Into<String>, why: impl Into<String>) -> Row {
        Row::new(measurement).rig(format!("not run: {}", why.into()))
    }
}

/// A markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| measurement | rig | baseline(s) | ratio / added | target | met? |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            cell(&r.measurement),
            cell(&r.rig),
            cell(&r.baselines),
            cell(&r.ratio),
            cell(&r.target),
            met
        );
    }
    out
}

fn cell(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.replace('|', "\\|").replace('\n', " ")
    }
}

/// `12.3 Gbit/s` from bits per second.
pub fn gbits(bps: f64) -> String {
    format!("{:.1} Gbit/s", bps / 1e9)
}

/// A duration in microseconds with one decimal.
pub fn us(v: f64) -> String {
    format!("{v:.1} µs")
}

/// A duration in milliseconds with three decimals.
pub fn ms(v_us: f64) -> String {
    format!("{:.3} ms", v_us / 1000.0)
}

pub fn kib(v: f64) -> String {
    format!("{v:.1} KiB")
}

pub fn rate(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k/s", v / 1000.0)
    } else {
        format!("{v:.0}/s")
    }
}

/// The median of `v` (the mean of the middle two for an even count); 0 when empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}
