//! The input.json parser on arbitrary bytes: never panics; whatever it accepts is a valid
//! input that survives a round trip through the course format unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match distbank::input::parse(text, "fuzz.json") {
        Ok(input) => {
            let saved = distbank::bench::input_json(&input);
            let again = distbank::input::parse(&saved, "saved.json").expect("an accepted input saves and parses back");
            assert_eq!(again, input, "round trip changed the input");
        }
        Err(error) => {
            // Errors always say where: the file name starts every message.
            assert!(error.to_string().starts_with("fuzz.json"), "unlocated error: {error}");
        }
    }
});
