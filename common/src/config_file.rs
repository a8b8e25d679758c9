//! Config files for both daemons: `--config PATH` names a TOML file whose keys are the daemon's
//! long options, dashes written as underscores (`max_per_client = 64`, `publish = ["8080:80"]`).
//! Every option has a key; an option given on the command line overrides the file's key
//! entirely (a list too). The file's values go through the same parsers as the flags, so a bad
//! value gets the same message, prefixed by the file, the line and the key. An unknown key, a
//! list where one value goes, or a table is an error naming its line; nothing is ignored.
//!
//! It works by turning the file into command-line arguments placed before the real ones, so
//! clap stays the one definition of every option, its default and its check.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command, CommandFactory};
use toml::de::{DeTable, DeValue};

/// Why a configuration could not be read.
#[derive(Debug)]
pub enum ConfigError {
    /// The command line itself is wrong (or asks for help or the version): clap's own error.
    Cli(clap::Error),
    /// The file is unreadable or wrong; the message names the file, and the line and key.
    File(String),
}

impl ConfigError {
    /// Prints the error and exits: 2 for a bad configuration, as clap does for a bad command
    /// line (0 for `--help` and `--version`).
    pub fn exit(self) -> ! {
        match self {
            ConfigError::Cli(e) => e.exit(),
            ConfigError::File(msg) => {
                eprintln!("error: {msg}");
                std::process::exit(2)
            }
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Cli(e) => write!(f, "{}", e.render().to_string().trim_end()),
            ConfigError::File(msg) => f.write_str(msg),
        }
    }
}

/// Where each value of the configuration was set, for checks that span several options.
#[derive(Debug, Default, Clone)]
pub struct Origin {
    path: Option<PathBuf>,
    /// Option (long name) -> the line of each of its values, when the file set it.
    lines: HashMap<String, Vec<usize>>,
}

impl Origin {
    /// Where the `i`th value of option `long` was set: "config file PATH line N" or "the command
    /// line".
    pub fn of(&self, long: &str, i: usize) -> String {
        match (&self.path, self.lines.get(long).and_then(|l| l.get(i))) {
            (Some(path), Some(line)) => format!("config file {} line {line}", path.display()),
            _ => "the command line".into(),
        }
    }
}

/// Parses the process's arguments and the config file they name; on error, says why and exits.
pub fn parse<T: clap::Parser>() -> (T, Origin) {
    try_parse(std::env::args_os().collect()).unwrap_or_else(|e| e.exit())
}

/// Parses `args` (the program name first) and the config file they name, if any.
pub fn try_parse<T: clap::Parser>(args: Vec<OsString>) -> Result<(T, Origin), ConfigError> {
    let mut all = try_parse_sections::<T>(args, &Sections::NONE)?;
    Ok(all.remove(0))
}

/// Repeated tables of a config file, each one more instance of a daemon's per-instance options:
/// host-proxy's `[[enclaves]]`.
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    /// The tables' key (`enclaves`).
    pub key: &'a str,
    /// The keys a table may set; every other key is set once, at the top of the file.
    pub keys: &'a [&'a str],
}

impl Sections<'_> {
    /// No sections: a file of top-level keys only.
    pub const NONE: Sections<'static> = Sections { key: "", keys: &[] };
}

/// Parses `args` and the config file they name, if any, once per `[[sections.key]]` table of
/// the file: each parse takes the top of the file, then that table, then the command line.
/// Without such tables (or a file) the result is the one parse. Where there are tables, the
/// keys they may set are theirs alone: the top of the file and the command line must not set
/// them.
pub fn try_parse_sections<T: clap::Parser>(
    args: Vec<OsString>,
    sections: &Sections<'_>,
) -> Result<Vec<(T, Origin)>, ConfigError> {
    let cmd = T::command();
    let Some(path) = config_path(&args) else {
        let config = T::try_parse_from(args).map_err(ConfigError::Cli)?;
        return Ok(vec![(config, Origin::default())]);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::File(format!("config file {}: {e}", path.display())))?;
    let (top, tables) = FileArgs::read(&cmd, &path, &text, &args, sections)?;
    if !tables.is_empty() {
        let key = sections.key;
        for long in sections.keys.iter().map(|k| k.replace('_', "-")) {
            let short = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()))
                .and_then(clap::Arg::get_short);
            if on_command_line(&args, &long, short) {
                return Err(ConfigError::File(format!(
                    "--{long}: config file {} has [[{key}]] tables, so `{}` is set in each of \
                     them, not on the command line",
                    path.display(),
                    long.replace('-', "_")
                )));
            }
        }
    }
    let parts: Vec<FileArgs> = if tables.is_empty() {
        vec![top]
    } else {
        tables.into_iter().map(|t| top.then(t)).collect()
    };
    parts
        .into_iter()
        .map(|file| {
            let mut merged = vec![args[0].clone()];
            merged.extend(file.args.iter().map(OsString::from));
            merged.extend(args[1..].iter().cloned());
            let matches = cmd
                .clone()
                .try_get_matches_from(merged)
                .map_err(|e| file.blame(e))?;
            let config = T::from_arg_matches(&matches).map_err(|e| file.blame(e))?;
            let origin = Origin {
                path: Some(path.clone()),
                lines: file.value_lines,
            };
            Ok((config, origin))
        })
        .collect()
}

/// The value of `--config` on the command line.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// Whether the command line sets the option `long` (or its short form).
fn on_command_line(args: &[OsString], long: &str, short: Option<char>) -> bool {
    let options = args.iter().skip(1).take_while(|a| *a != "--");
    options.map(|a| a.to_string_lossy()).any(|a| {
        a == format!("--{long}")
            || a.starts_with(&format!("--{long}="))
            || short.is_some_and(|s| a.starts_with(&format!("-{s}")) && !a.starts_with("--"))
    })
}

/// A config file turned into arguments, with where each option came from.
struct FileArgs {
    path: PathBuf,
    args: Vec<String>,
    /// Option (long name) -> the key and the line it was set on.
    lines: HashMap<String, (String, usize)>,
    /// Option (long name) -> the line of each value.
    value_lines: HashMap<String, Vec<usize>>,
    /// For one `[[section]]` table: the line it starts on.
    table_line: Option<usize>,
}

impl FileArgs {
    /// Reads the file's top-level keys, and each `[[sections.key]]` table apart.
    fn read(
        cmd: &Command,
        path: &Path,
        text: &str,
        cli: &[OsString],
        sections: &Sections<'_>,
    ) -> Result<(FileArgs, Vec<FileArgs>), ConfigError> {
        let at = |span: std::ops::Range<usize>| line_of(text, span.start);
        let err = |line: usize, msg: String| {
            ConfigError::File(format!("config file {} line {line}: {msg}", path.display()))
        };
        let table = DeTable::parse(text).map_err(|e| {
            let line = e.span().map_or(1, at);
            err(line, e.message().trim().to_string())
        })?;
        let empty = || FileArgs {
            path: path.to_path_buf(),
            args: Vec::new(),
            lines: HashMap::new(),
            value_lines: HashMap::new(),
            table_line: None,
        };
        let mut tables = Vec::new();
        if let Some((key, value)) = table
            .get_ref()
            .iter()
            .find(|(k, _)| !sections.key.is_empty() && k.get_ref() == sections.key)
        {
            let line = at(key.span());
            let DeValue::Array(items) = value.get_ref() else {
                let msg = format!("`{}` is a list of tables: write [[{0}]]", sections.key);
                return Err(err(line, msg));
            };
            if items.is_empty() {
                let msg = format!(
                    "`{}` has no tables: write one [[{0}]] per instance",
                    sections.key
                );
                return Err(err(line, msg));
            }
            for item in items {
                let DeValue::Table(t) = item.get_ref() else {
                    let msg = format!("`{}` is a list of tables: write [[{0}]]", sections.key);
                    return Err(err(at(item.span()), msg));
                };
                let mut part = empty();
                part.table_line = Some(at(item.span()));
                for (key, value) in t {
                    let name = key.get_ref();
                    // A dashed per-table key falls through to `add`, which names the right one.
                    if !sections.keys.contains(&name.replace('-', "_").as_str()) {
                        let line = at(key.span());
                        let msg = format!(
                            "key `{name}` is not set per [[{}]]: set it once, at the top of the \
                             file (per table: {})",
                            sections.key,
                            sections.keys.join(", ")
                        );
                        return Err(
                            match cmd
                                .get_arguments()
                                .any(|a| a.get_long() == Some(name.replace('_', "-").as_str()))
                            {
                                true => err(line, msg),
                                false => err(line, format!("unknown key `{name}`")),
                            },
                        );
                    }
                    part.add(cmd, text, key, value, &[])?;
                }
                tables.push(part);
            }
        }
        let mut top = empty();
        for (key, value) in table.get_ref() {
            let name = key.get_ref();
            if !sections.key.is_empty() && name == sections.key {
                continue;
            }
            if !tables.is_empty() && sections.keys.contains(&name.as_ref()) {
                return Err(err(
                    at(key.span()),
                    format!(
                        "key `{name}` belongs in each [[{}]] table when the file has them",
                        sections.key
                    ),
                ));
            }
            top.add(cmd, text, key, value, cli)?;
        }
        Ok((top, tables))
    }

    /// `self`'s arguments followed by `more`'s.
    fn then(&self, more: FileArgs) -> FileArgs {
        let mut out = FileArgs {
            path: self.path.clone(),
            args: self.args.clone(),
            lines: self.lines.clone(),
            value_lines: self.value_lines.clone(),
            table_line: more.table_line,
        };
        out.args.extend(more.args);
        out.lines.extend(more.lines);
        out.value_lines.extend(more.value_lines);
        out
    }

    /// Turns one key and its value into arguments, unless the command line `cli` sets it.
    fn add(
        &mut self,
        cmd: &Command,
        text: &str,
        key: &toml::Spanned<std::borrow::Cow<'_, str>>,
        value: &toml::Spanned<DeValue<'_>>,
        cli: &[OsString],
    ) -> Result<(), ConfigError> {
        let at = |span: std::ops::Range<usize>| line_of(text, span.start);
        let err = |line: usize, msg: String| {
            ConfigError::File(format!(
                "config file {} line {line}: {msg}",
                self.path.display()
            ))
        };
        let line = at(key.span());
        let name = key.get_ref().to_string();
        let long = name.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && a.get_id() != "config");
        let Some(arg) = arg.filter(|_| !name.contains('-')) else {
            let hint = if name.contains('-')
                && cmd
                    .get_arguments()
                    .any(|a| a.get_long() == Some(name.as_str()))
            {
                format!(" (write it `{}`)", name.replace('-', "_"))
            } else if name == "config" {
                " (a config file cannot name another)".to_string()
            } else {
                String::new()
            };
            return Err(err(line, format!("unknown key `{name}`{hint}")));
        };
        if on_command_line(cli, &long, arg.get_short()) {
            return Ok(());
        }
        let values: Vec<&toml::Spanned<DeValue<'_>>> = match value.get_ref() {
            DeValue::Array(items) => items.iter().collect(),
            _ => vec![value],
        };
        let flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let many = matches!(arg.get_action(), ArgAction::Append);
        if matches!(value.get_ref(), DeValue::Array(_)) && !many {
            return Err(err(
                line,
                format!("key `{name}` takes one value, not a list"),
            ));
        }
        for v in values {
            let vline = at(v.span());
            let text = match v.get_ref() {
                DeValue::Boolean(b) if flag => {
                    if *b {
                        self.args.push(format!("--{long}"));
                    }
                    continue;
                }
                _ if flag => {
                    return Err(err(vline, format!("key `{name}` is true or false")));
                }
                DeValue::String(s) => s.to_string(),
                DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
                    .map_err(|e| err(vline, format!("key `{name}`: {e}")))?
                    .to_string(),
                DeValue::Float(f) => f.as_str().to_string(),
                DeValue::Boolean(b) => b.to_string(),
                DeValue::Datetime(_) | DeValue::Array(_) | DeValue::Table(_) => {
                    return Err(err(
                        vline,
                        format!("key `{name}` takes a string or a number here"),
                    ));
                }
            };
            self.args.push(format!("--{long}={text}"));
            self.value_lines
                .entry(long.clone())
                .or_default()
                .push(vline);
        }
        self.lines.insert(long, (name, line));
        Ok(())
    }

    /// clap's error, told as the file's when the option it is about came from the file.
    fn blame(&self, e: clap::Error) -> ConfigError {
        let arg = e.context().find_map(|(kind, value)| match (kind, value) {
            (clap::error::ContextKind::InvalidArg, clap::error::ContextValue::String(s)) => {
                Some(s.clone())
            }
            _ => None,
        });
        let long = arg.as_deref().and_then(|a| {
            let a = a.strip_prefix("--")?;
            Some(a.split([' ', '=', '<']).next().unwrap_or(a).to_string())
        });
        match long.and_then(|l| self.lines.get(&l)) {
            Some((key, line)) => ConfigError::File(format!(
                "config file {} line {line}: key `{key}`: {}",
                self.path.display(),
                first_line(&e)
            )),
            None => match (self.table_line, e.kind()) {
                // What no key of the file is to blame for (a required option missing, say):
                // said of the table, when the parse was for one.
                (Some(line), kind)
                    if kind != clap::error::ErrorKind::DisplayHelp
                        && kind != clap::error::ErrorKind::DisplayVersion =>
                {
                    ConfigError::File(format!(
                        "config file {} line {line}: in this table: {}",
                        self.path.display(),
                        first_paragraph(&e)
                    ))
                }
                _ => ConfigError::Cli(e),
            },
        }
    }
}

/// Checks an example config file for `T` (`program` names it in errors): it has a key for every
/// option (live or commented out), it loads, and it still loads with every commented-out
/// `# key = value` line made live. Returns the latter configuration, or what is wrong.
pub fn check_example<T: clap::Parser>(program: &str, path: &Path) -> Result<(T, Origin), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let missing = missing_keys::<T>(&text);
    if !missing.is_empty() {
        return Err(format!("{} has no key for {missing:?}", path.display()));
    }
    let args = |p: &Path| vec![program.into(), "--config".into(), p.into()];
    try_parse::<T>(args(path)).map_err(|e| e.to_string())?;
    let live = std::env::temp_dir().join(format!("{program}-example-{}.toml", std::process::id()));
    std::fs::write(&live, uncommented(&text)).map_err(|e| e.to_string())?;
    let loaded = try_parse::<T>(args(&live));
    let _ = std::fs::remove_file(&live);
    loaded.map_err(|e| format!("with every example value live: {e}"))
}

/// The options of `T` that the config file `text` has no key for, live or commented out
/// (`# key = ...`): for tests that an example file is complete.
pub fn missing_keys<T: CommandFactory>(text: &str) -> Vec<String> {
    T::command()
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_id() != "config")
        .filter_map(|a| a.get_long())
        .filter(|long| !["help", "version"].contains(long))
        .map(|long| long.replace('-', "_"))
        .filter(|key| {
            !text.lines().any(|l| {
                let l = l.strip_prefix("# ").unwrap_or(l);
                l.strip_prefix(key.as_str())
                    .is_some_and(|rest| rest.starts_with(" = "))
            })
        })
        .collect()
}

/// `text` with every commented-out `# key = value` line made live: for tests that every value
/// an example file shows is accepted.
pub fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first line of a clap error, without its `error: ` prefix.
fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// The first paragraph of a clap error on one line, without its `error: ` prefix (a missing
/// option's name is on the line after the first).
fn first_paragraph(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let joined = lines.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A daemon's options in miniature.
    #[derive(Debug, Parser, PartialEq)]
    struct Opts {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        enclave: String,
        #[arg(long, default_value = "256", value_parser = clap::value_parser!(u32).range(1..))]
        max_per_client: u32,
        #[arg(long = "publish", short = 'p')]
        publish: Vec<String>,
        #[arg(long)]
        no_dns: bool,
        #[arg(long, value_parser = crate::cli::parse_secs)]
        dns_timeout: Option<std::time::Duration>,
    }

    fn run(file: &str, cli: &[&str]) -> Result<Opts, String> {
        run_sections(file, cli, &Sections::NONE).map(|mut all| all.remove(0))
    }

    const PER_ENCLAVE: Sections<'static> = Sections {
        key: "enclaves",
        keys: &["enclave", "publish"],
    };

    fn run_sections(
        file: &str,
        cli: &[&str],
        sections: &Sections<'_>,
    ) -> Result<Vec<Opts>, String> {
        let dir = std::env::temp_dir().join(format!("enet-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.toml"));
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<OsString> = vec!["daemon".into(), "--config".into(), path.clone().into()];
        args.extend(cli.iter().map(OsString::from));
        let r = try_parse_sections::<Opts>(args, sections)
            .map(|all| all.into_iter().map(|(o, _)| o).collect())
            .map_err(|e| e.to_string().replace(&path.display().to_string(), "F"));
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn every_kind_of_value_is_read() {
        let o = run(
            "enclave = \"unix:/e\"\nmax_per_client = 0x10\npublish = [\"80\", \"443:8443\"]\nno_dns = true\ndns_timeout = 1.5\n",
            &[],
        )
        .unwrap();
        assert_eq!(o.enclave, "unix:/e");
        assert_eq!(o.max_per_client, 16);
        assert_eq!(o.publish, ["80", "443:8443"]);
        assert!(o.no_dns);
        assert_eq!(o.dns_timeout, Some(std::time::Duration::from_millis(1500)));
    }

    #[test]
    fn the_command_line_overrides_a_key_lists_included() {
        let file = "enclave = \"unix:/e\"\nmax_per_client = 3\npublish = [\"80\", \"81\"]\n";
        let o = run(file, &["--max-per-client", "9", "-p", "90"]).unwrap();
        assert_eq!((o.max_per_client, o.publish), (9, vec!["90".to_string()]));
        let o = run(file, &["--publish=91"]).unwrap();
        assert_eq!(o.publish, ["91"]);
        // Where each value came from, for checks across options.
        let dir = std::env::temp_dir().join(format!("enet-origin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("o.toml");
        std::fs::write(
            &path,
            "enclave = \"x\"\npublish = [\n  \"80\",\n  \"81\",\n]\n",
        )
        .unwrap();
        let args = vec!["d".into(), "--config".into(), path.clone().into()];
        let (_, origin) = try_parse::<Opts>(args).unwrap();
        let at = format!("config file {} line", path.display());
        assert_eq!(origin.of("publish", 1), format!("{at} 4"));
        assert_eq!(origin.of("max-per-client", 0), "the command line");
        let _ = std::fs::remove_dir_all(&dir);
        // Defaults still apply to what neither sets.
        let o = run("enclave = \"x\"", &[]).unwrap();
        assert_eq!(o.max_per_client, 256);
    }

    #[test]
    fn mistakes_name_the_key_and_the_line() {
        let cases = [
            (
                "enclave = \"x\"\n\nmax_per_clint = 3\n",
                "line 3: unknown key `max_per_clint`",
            ),
            (
                "enclave = \"x\"\nmax-per-client = 3\n",
                "line 2: unknown key `max-per-client` (write it `max_per_client`)",
            ),
            (
                "enclave = \"x\"\nmax_per_client = 0\n",
                "line 2: key `max_per_client`: invalid value '0'",
            ),
            (
                "enclave = \"x\"\ndns_timeout = \"soon\"\n",
                "line 2: key `dns_timeout`: invalid value 'soon'",
            ),
            (
                "enclave = [\"x\", \"y\"]\n",
                "line 1: key `enclave` takes one value, not a list",
            ),
            (
                "enclave = \"x\"\nno_dns = \"yes\"\n",
                "line 2: key `no_dns` is true or false",
            ),
            ("enclave = \"x\"\n[publish]\nport = 80\n", "line 2"),
            ("enclave = \"x\"\nmax_per_client = \n", "line 2:"),
            (
                "config = \"other.toml\"\n",
                "line 1: unknown key `config` (a config file cannot name another)",
            ),
        ];
        for (file, want) in cases {
            let got = run(file, &[]).expect_err(file);
            assert!(
                got.starts_with("config file F ") && got.contains(want),
                "{file:?}: {got}"
            );
        }
        // A missing required option is clap's own error; a missing file names the file.
        assert!(run("max_per_client = 3", &[])
            .unwrap_err()
            .contains("--enclave"));
        let e = try_parse::<Opts>(vec!["d".into(), "--config=/nonexistent/x.toml".into()]);
        assert!(e.unwrap_err().to_string().contains("/nonexistent/x.toml"));
    }

    #[test]
    fn each_table_is_one_more_instance_over_the_shared_keys() {
        let file = "max_per_client = 7\n\n[[enclaves]]\nenclave = \"unix:/a\"\npublish = [\"80\"]\n\n[[enclaves]]\nenclave = \"unix:/b\"\n";
        let all = run_sections(file, &["--no-dns"], &PER_ENCLAVE).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].enclave.as_str(), all[1].enclave.as_str()),
            ("unix:/a", "unix:/b")
        );
        assert_eq!(all[0].publish, ["80"]);
        assert!(all[1].publish.is_empty(), "a table's list is its own");
        assert!(all.iter().all(|o| o.max_per_client == 7 && o.no_dns));
        // No tables: the file is one instance, per-instance keys at the top as usual.
        let one = run_sections(
            "enclave = \"unix:/a\"\npublish = [\"80\"]\n",
            &[],
            &PER_ENCLAVE,
        )
        .unwrap();
        assert_eq!((one.len(), one[0].publish.len()), (1, 1));
        let cases: [(&str, &[&str], &str); 8] = [
            (
                "publish = [\"81\"]\n[[enclaves]]\nenclave = \"unix:/a\"\n",
                &[],
                "line 1: key `publish` belongs in each [[enclaves]] table",
            ),
            (
                "[[enclaves]]\nenclave = \"unix:/a\"\nmax_per_client = 3\n",
                &[],
                "line 3: key `max_per_client` is not set per [[enclaves]]",
            ),
            (
                "[[enclaves]]\nenclave = \"unix:/a\"\nmax_per_clint = 3\n",
                &[],
                "line 3: unknown key `max_per_clint`",
            ),
            (
                "[[enclaves]]\nenclave = \"unix:/a\"\n",
                &["-p", "80"],
                "--publish: config file F has [[enclaves]] tables",
            ),
            (
                "enclaves = \"x\"\n",
                &[],
                "line 1: `enclaves` is a list of tables",
            ),
            (
                "[[enclaves]]\nenclave = \"unix:/a\"\n[[enclaves]]\npublish = [\"x\"]\n",
                &[],
                "line 3: in this table: the following required arguments were not provided: --enclave",
            ),
            (
                "[[enclaves]]\nenclave = \"unix:/a\"\npub-lish = [\"80\"]\n",
                &[],
                "line 3: unknown key `pub-lish`",
            ),
            ("enclaves = []\n", &[], "line 1: `enclaves` has no tables"),
        ];
        for (file, cli, want) in cases {
            let got = run_sections(file, cli, &PER_ENCLAVE).expect_err(file);
            assert!(got.contains(want), "{file:?}: {got}");
        }
    }
}
