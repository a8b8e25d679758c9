//! Writes the fuzz targets' seed corpus, or checks that the committed one is current.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml -p enclave-net-fuzz-corpus -- write fuzz/corpus
//! cargo run --manifest-path fuzz/Cargo.toml -p enclave-net-fuzz-corpus -- check fuzz/corpus
//! ```
//!
//! Each target's directory is made to hold exactly the generated seeds, so a seed that an encoder
//! change made stale (a version bump, a new field) shows up in `check`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, dir) = match args.as_slice() {
        [mode, dir] if mode == "write" || mode == "check" => (mode.as_str(), Path::new(dir)),
        _ => {
            eprintln!("usage: corpus-gen write|check CORPUS_DIR");
            return ExitCode::from(2);
        }
    };
    let mut by_target: BTreeMap<&str, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for seed in fuzz_corpus::seeds() {
        let old = by_target
            .entry(seed.target)
            .or_default()
            .insert(seed.name.to_string(), seed.bytes);
        assert!(
            old.is_none(),
            "two seeds named {}/{}",
            seed.target,
            seed.name
        );
    }
    let mut stale = 0;
    for (target, seeds) in &by_target {
        let tdir = dir.join(target);
        if mode == "write" {
            if let Err(e) = write_dir(&tdir, seeds) {
                eprintln!("{}: {e}", tdir.display());
                return ExitCode::FAILURE;
            }
            println!("{}: {} seeds", tdir.display(), seeds.len());
        } else {
            stale += check_dir(&tdir, seeds);
        }
    }
    if stale > 0 {
        eprintln!(
            "{stale} seed files differ from the generator: run corpus-gen write {}",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn write_dir(tdir: &Path, seeds: &BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    std::fs::create_dir_all(tdir)?;
    for entry in std::fs::read_dir(tdir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !seeds.contains_key(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    for (name, bytes) in seeds {
        std::fs::write(tdir.join(name), bytes)?;
    }
    Ok(())
}

fn check_dir(tdir: &Path, seeds: &BTreeMap<String, Vec<u8>>) -> usize {
    let mut stale = 0;
    let on_disk: Vec<String> = match std::fs::read_dir(tdir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            eprintln!("{}: {e}", tdir.display());
            return seeds.len().max(1);
        }
    };
    for name in &on_disk {
        if !seeds.contains_key(name) {
            eprintln!("{}/{name}: not a generated seed", tdir.display());
            stale += 1;
        }
    }
    for (name, bytes) in seeds {
        match std::fs::read(tdir.join(name)) {
            Ok(have) if &have == bytes => {}
            Ok(_) => {
                eprintln!("{}/{name}: differs from the generator", tdir.display());
                stale += 1;
            }
            Err(e) => {
                eprintln!("{}/{name}: {e}", tdir.display());
                stale += 1;
            }
        }
    }
    stale
}
