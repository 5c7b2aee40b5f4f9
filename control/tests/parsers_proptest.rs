//! Property tests: the parsers that read what users write (specs, chaos policies, presets,
//! durations, sizes, rates, addresses, headers) never panic, whatever the input, and what they
//! accept stays inside rig's bounds.
//!
//! Inputs are arbitrary text, and the shipped specs and presets mutated (a range cut out, text
//! spliced in, a value replaced), which reaches deep into the validators instead of failing at
//! the first byte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use rig_control::cli::parse_header;
use rig_control::daemon::parse_addr;
use rig_control::presets;
use rig_control::spec::{self, Format};
use rig_proxy::policy::{ByteRate, ByteSize, ChaosSpec, HumanDuration, Protocol};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("control/ has a parent")
        .to_path_buf()
}

fn files(dir: &str, ext: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(repo().join(dir))
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            (p.display().to_string(), text)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no *.{ext} in {dir}");
    out
}

fn shipped_specs() -> Vec<(String, String)> {
    let mut v = files("specs", "toml");
    v.extend(files("specs/examples", "toml"));
    v
}

/// Text spliced into a file: fragments that mean something to the parsers, or noise.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"18446744073709551615s\"".to_string()),
        Just("\"1e400ms\"".to_string()),
        Just("-1".to_string()),
        Just("\"NaN\"".to_string()),
        Just("[chaos]\nlatency = \"99999h\"\n".to_string()),
        Just("error_rate = 1.5\n".to_string()),
        Just("bandwidth = \"0\"\n".to_string()),
        Just("protocol = \"udp\"\n".to_string()),
        Just("\"${\"".to_string()),
        Just("{ x = [".to_string()),
        Just("\u{0}\u{feff}é\u{10ffff}".to_string()),
        "[a-z_.=\\[\\]\"{}, 0-9\n-]{0,40}",
        any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Cut(usize, usize),
    Splice(usize, String),
    Replace(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0usize..64).prop_map(|(a, n)| Mutation::Cut(a, n)),
        (any::<usize>(), fragment()).prop_map(|(a, s)| Mutation::Splice(a, s)),
        (any::<usize>(), fragment()).prop_map(|(a, s)| Mutation::Replace(a, s)),
    ]
}

/// Applies `m` at a char boundary of `text`.
fn mutate(text: &str, m: &Mutation) -> String {
    let at = |i: usize| {
        let mut i = i % (text.len() + 1);
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match m {
        Mutation::Cut(a, n) => {
            let start = at(*a);
            let end = at(start.saturating_add(*n).min(text.len()));
            let end = end.max(start);
            format!("{}{}", &text[..start], &text[end..])
        }
        Mutation::Splice(a, s) => {
            let i = at(*a);
            format!("{}{s}{}", &text[..i], &text[i..])
        }
        Mutation::Replace(a, s) => {
            // Replace the value after the `=` of the line at `a`.
            let i = at(*a);
            let line_start = text[..i].rfind('\n').map_or(0, |p| p + 1);
            let line_end = text[i..].find('\n').map_or(text.len(), |p| i + p);
            match text[line_start..line_end].find('=') {
                Some(eq) => format!("{} {s}{}", &text[..line_start + eq + 1], &text[line_end..]),
                None => text.to_string(),
            }
        }
    }
}

/// Parsing a spec either succeeds or gives an error that can be shown.
fn check_spec(text: &str, format: Format, origin: &str) {
    if let Err(e) = spec::parse(text, format, origin) {
        let shown = e.to_string();
        assert!(!shown.is_empty());
        assert!(shown.contains(origin), "the error names the file: {shown}");
    }
}

/// Every protocol's validation of a chaos policy either succeeds or errs; none panics.
fn check_chaos(text: &str) {
    if let Ok(c) = toml::from_str::<ChaosSpec>(text) {
        for p in [Protocol::Http, Protocol::Grpc, Protocol::Tcp] {
            let _ = c.validate(p);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_spec_or_an_error(text in any::<String>()) {
        check_spec(&text, Format::Toml, "any.toml");
        check_spec(&text, Format::Json, "any.json");
    }

    #[test]
    fn mutated_shipped_specs_parse_or_err(i in any::<usize>(), ms in prop::collection::vec(mutation(), 1..4)) {
        let specs = shipped_specs();
        let (name, text) = &specs[i % specs.len()];
        let mut t = text.clone();
        for m in &ms {
            t = mutate(&t, m);
        }
        check_spec(&t, Format::Toml, name);
    }

    #[test]
    fn mutated_presets_parse_or_err(i in any::<usize>(), ms in prop::collection::vec(mutation(), 1..4)) {
        let presets_ = files("chaos-presets", "toml");
        let (name, text) = &presets_[i % presets_.len()];
        let mut t = text.clone();
        for m in &ms {
            t = mutate(&t, m);
        }
        let _ = presets::parse(name, &t);
        check_chaos(&t);
    }

    #[test]
    fn generated_chaos_policies_validate_or_err(
        fields in prop::collection::vec((
            prop::sample::select(vec![
                "latency", "jitter", "latency_p99", "error_rate", "status", "grpc_code",
                "reset_after", "hang_rate", "hang_for", "bandwidth", "bandwidth_upstream",
                "limit_data", "slow_close", "seed", "ttl", "body", "partition", "direction",
            ]),
            prop_oneof![
                "\"[0-9]{1,25}(\\.[0-9]{0,5})?(ns|us|ms|s|m|h|d|y)?\"",
                "\"[0-9]{1,22}(\\.[0-9]{1,3})?(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?(/s)?\"",
                "-?[0-9]{1,22}(\\.[0-9]{1,5})?",
                Just("true".to_string()),
                Just("\"both\"".to_string()),
                fragment(),
            ],
        ), 0..6),
    ) {
        let text: String = fields.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        check_chaos(&text);
    }

    #[test]
    fn durations_never_panic_and_accepted_ones_round_trip(s in any::<String>()) {
        let _ = s.parse::<HumanDuration>();
        let _ = s.parse::<ByteSize>();
        let _ = s.parse::<ByteRate>();
        let _ = parse_addr(&s);
        let _ = parse_header(&s);
    }

    #[test]
    fn numeric_durations_parse_exactly_or_err(
        n in any::<u64>(),
        frac in prop::option::of(0u32..1000),
        unit in prop::sample::select(vec!["ns", "us", "ms", "s", "m", "h", "d"]),
    ) {
        let s = match frac {
            Some(f) => format!("{n}.{f:03}{unit}"),
            None => format!("{n}{unit}"),
        };
        if let Ok(HumanDuration(d)) = s.parse::<HumanDuration>() {
            // What parses is what was written, to within the rounding of a decimal.
            let per = match unit {
                "ns" => 1e-9, "us" => 1e-6, "ms" => 1e-3, "s" => 1.0, "m" => 60.0,
                "h" => 3600.0, _ => 86400.0,
            };
            let want = (n as f64 + f64::from(frac.unwrap_or(0)) / 1000.0) * per;
            let got = d.as_secs_f64();
            prop_assert!((got - want).abs() <= want * 1e-6 + 1e-6, "{s}: {got} != {want}");
        }
    }

    #[test]
    fn an_accepted_latency_is_within_rigs_bound(s in "[0-9]{1,22}(\\.[0-9]{1,3})?(ms|s|m|h|d)") {
        let text = format!("latency = \"{s}\"\n");
        if let Ok(c) = toml::from_str::<ChaosSpec>(&text)
            && c.validate(Protocol::Tcp).is_ok()
        {
            let HumanDuration(d) = s.parse::<HumanDuration>().expect("validated, so it parses");
            prop_assert!(d <= Duration::from_secs(3600), "{s} accepted as latency");
        }
    }
}
