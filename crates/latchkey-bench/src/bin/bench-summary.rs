//! Prints the adapter-vs-raw table from `target/criterion` (used by `cargo xtask bench`).

fn main() {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("criterion");
    print!("{}", latchkey_bench::summary(&dir));
}
