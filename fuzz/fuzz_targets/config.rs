//! A configuration file's text through the loader (`Config::load_str`, the path
//! `Config::load_with` takes after reading the file), with no environment and no credentials.
//!
//! Properties, beyond not panicking: an error names the file and says something; a loaded
//! configuration renders (`to_toml`, what `check-config` prints) as TOML that loads again and
//! renders the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nn_gateway::config::Config;

const NAME: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The loader reads the files `*_file` keys name; one of these would read for ever.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    match Config::load_str(text, NAME, &[], None) {
        Err(e) => {
            // The file, or the file and a line of it (`NAME:3`) that exists.
            if e.origin != NAME {
                let line: usize = e
                    .origin
                    .strip_prefix(NAME)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("the error names {:?}, not {NAME}", e.origin));
                assert!(
                    (1..=text.lines().count()).contains(&line),
                    "line {line} of {} lines",
                    text.lines().count()
                );
            }
            assert!(!e.message.trim().is_empty(), "an empty error message");
            assert!(e.to_string().starts_with(NAME));
        }
        Ok(cfg) => {
            let shown = cfg.to_toml();
            assert!(!shown.starts_with("# cannot render"), "{shown}");
            let again = Config::load_str(&shown, NAME, &[], None)
                .unwrap_or_else(|e| panic!("check-config output does not load: {e}\n{shown}"));
            assert_eq!(again.to_toml(), shown, "rendering is stable");
        }
    }
});
