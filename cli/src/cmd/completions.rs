//! `overlayctl completions SHELL` and `overlayctl man [--out DIR]`: shell completion
//! scripts (clap_complete) and manual pages (clap_mangen).
//!
//! Both are generated at run time from the same clap definition that parses the command
//! line ([`crate::Cli`]), by the binary they describe. So they can never disagree with the
//! flags of the `overlayctl` that is installed, and there is nothing generated to keep in
//! the repository or regenerate in a build script (which could not see the `Cli` type of a
//! binary crate anyway). Packagers run `overlayctl completions bash` and
//! `overlayctl man --out DIR` once at install time; `make man` does the latter.
//!
//! The help subcommand is left out of the manual: it has no page of its own, and listing
//! it would point readers at `overlayctl-help(1)`, which does not exist.
//!
//! Everything is rendered into memory first and then written, so a closed pipe
//! (`overlayctl man | head`) or a full disk is an error returned to `main`, never a panic
//! inside a generator.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;

use crate::output::{self, Format};

/// The name completions are registered for and pages are titled with.
pub const BIN_NAME: &str = "overlayctl";
/// The manual a page belongs to (the centre footer of a rendered page).
pub const MANUAL: &str = "Overlay Manual";

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to print a completion script for
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write overlayctl.1 and one page per subcommand (overlayctl-lease-revoke.1, ...) into
    /// this directory, created if missing; without it, print overlayctl.1 to stdout
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// The completion script for `shell`.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut cmd = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN_NAME, &mut script);
    script
}

/// The command tree as the manual describes it: built (so subcommands carry their full
/// names, `overlayctl-lease-revoke`), without the help subcommand.
fn manual_tree() -> clap::Command {
    let mut cmd = crate::Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

fn render(cmd: &clap::Command) -> std::io::Result<(String, Vec<u8>)> {
    let man = Man::new(cmd.clone());
    let file = man.get_filename();
    let mut page = Vec::new();
    man.render(&mut page)?;
    let name = file.strip_suffix(".1").unwrap_or(&file);
    let title = format!(
        ".TH {name} 1 \"\" \"{BIN_NAME} {}\" \"{MANUAL}\"\n",
        env!("CARGO_PKG_VERSION")
    );
    Ok((file, retitle(&page, &title)))
}

/// Replaces the page's `.TH` line with `title`, as the first line.
///
/// clap_mangen leaves the date empty and the roff crate writes an empty argument as
/// nothing rather than `""`, so every later field slides one place left (the version
/// lands in the date's place, the manual's name in the source's). It also names the
/// source after the subcommand (`revoke 0.1.0`) rather than the program. And the roff
/// crate puts its definition of the `Aq` string first, while man(7) wants `.TH` to be the
/// first request; the definition only has to precede the first use of `\*(Aq`, in the
/// body, so it can follow the title.
fn retitle(page: &[u8], title: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let mut out = String::with_capacity(text.len() + title.len());
    out.push_str(title);
    for line in text.split_inclusive('\n') {
        if !line.starts_with(".TH ") {
            out.push_str(line);
        }
    }
    out.into_bytes()
}

/// `overlayctl.1`, in roff.
pub fn main_page() -> std::io::Result<Vec<u8>> {
    Ok(render(&manual_tree())?.1)
}

/// Every page: `overlayctl.1` first, then one per visible subcommand, depth first, as
/// (file name, roff).
pub fn all_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: &clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        pages.push(render(cmd)?);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, pages)?;
        }
        Ok(())
    }
    let mut pages = Vec::new();
    walk(&manual_tree(), &mut pages)?;
    Ok(pages)
}

/// Writes every page into `dir` (created if missing); returns the paths written.
pub fn write_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--out: cannot create {}", dir.display()))?;
    let pages = all_pages().context("rendering the manual pages")?;
    let mut written = Vec::with_capacity(pages.len());
    for (name, page) in pages {
        let path = dir.join(name);
        std::fs::write(&path, page)
            .with_context(|| format!("--out: cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

pub fn run_completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let script = completion_script(args.shell);
    output::print(&String::from_utf8_lossy(&script))?;
    Ok(())
}

pub fn run_man(args: ManArgs, format: Format) -> anyhow::Result<()> {
    let Some(dir) = args.out else {
        let page = main_page().context("rendering the manual page")?;
        output::print(&String::from_utf8_lossy(&page))?;
        return Ok(());
    };
    let written = write_pages(&dir)?;
    let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    let text = match format {
        Format::Json => output::json_pretty(&paths),
        Format::Table => paths.iter().map(|p| format!("{p}\n")).collect(),
    };
    output::print(&text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// Every visible command's full name, depth first (`overlayctl-lease-revoke`).
    fn command_names(cmd: &clap::Command, prefix: &str, names: &mut Vec<String>) {
        let name = if prefix.is_empty() {
            cmd.get_name().to_string()
        } else {
            format!("{prefix}-{}", cmd.get_name())
        };
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            command_names(sub, &name, names);
        }
        names.push(name);
    }

    #[test]
    fn every_command_gets_a_page_named_after_it() {
        let mut expected = Vec::new();
        command_names(
            &crate::Cli::command().disable_help_subcommand(true),
            "",
            &mut expected,
        );
        expected.sort();
        let pages = all_pages().unwrap();
        assert_eq!(pages[0].0, "overlayctl.1", "the main page comes first");
        let mut names: Vec<String> = pages
            .iter()
            .map(|(n, _)| n.strip_suffix(".1").expect("section 1").to_string())
            .collect();
        names.sort();
        assert_eq!(names, expected);
        for must in [
            "overlayctl-leases",
            "overlayctl-lease-revoke",
            "overlayctl-man",
        ] {
            assert!(names.iter().any(|n| n == must), "{must} in {names:?}");
        }
        for (name, page) in &pages {
            let text = String::from_utf8(page.clone()).unwrap();
            let title = name.strip_suffix(".1").unwrap();
            assert_eq!(
                text.lines().next().unwrap_or_default(),
                format!(
                    r#".TH {title} 1 "" "overlayctl {}" "Overlay Manual""#,
                    env!("CARGO_PKG_VERSION")
                ),
                "{name}"
            );
            assert_eq!(text.matches(".TH ").count(), 1, "{name}");
            assert!(!text.contains("overlayctl\\-help"), "{name} lists help");
        }
    }

    #[test]
    fn the_main_page_documents_global_flags_and_their_environment() {
        let page = String::from_utf8(main_page().unwrap()).unwrap();
        assert!(page.contains("OVERLAY_CONTROLLER"), "{page}");
        assert!(page.contains("\\-\\-output"), "{page}");
        assert!(page.contains(MANUAL), "{page}");
    }

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in Shell::value_variants() {
            let script = String::from_utf8(completion_script(*shell)).unwrap();
            for word in ["leases", "routes", "revoke", "controller"] {
                assert!(script.contains(word), "{shell}: no {word:?}");
            }
        }
    }

    #[test]
    fn pages_are_written_into_a_new_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("man/man1");
        let written = write_pages(&dir).unwrap();
        assert_eq!(written.len(), all_pages().unwrap().len());
        assert!(dir.join("overlayctl.1").is_file());
        assert!(dir.join("overlayctl-config-set.1").is_file());
        let blocked = tmp.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        let e = write_pages(&blocked.join("sub")).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("--out: cannot create"),
            "{e:#}"
        );
    }
}
