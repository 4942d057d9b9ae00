/**
 * The man page `sectorlog(1)`, rendered from the same command definitions as `--help` and the
 * completion scripts (`deno task man` writes it to docs/sectorlog.1). Only the prose that no
 * command definition holds (TIME, exit status, files) is written here.
 *
 * @module
 */
import type { Command } from "commander";
import { EXIT_BUSY, EXIT_FAILED, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE } from "../lib/errors.ts";
import { commandTree, type OptionSpec } from "./completions.ts";

/** Escapes text for roff: backslashes, hyphens (as minus signs) and a leading dot or quote. */
function roff(text: string): string {
  return text.replaceAll("\\", "\\e").replaceAll("-", "\\-").replace(/^([.'])/, "\\&$1");
}

/** The text a command adds after its help (`addHelpText("after", …)`): examples and notes. */
export function helpTextAfter(command: Command): string {
  let text = "";
  // Commander keeps help texts as listeners of its EventEmitter; its typings omit `emit`.
  const emitter = command as unknown as { emit(event: string, context: unknown): boolean };
  emitter.emit("afterHelp", {
    error: false,
    command,
    write: (chunk: string) => {
      text += chunk;
    },
  });
  return text;
}

/** Renders help-after text: "Example:" paragraphs as indented literal lines, the rest as prose. */
function renderAfterText(text: string): string[] {
  const lines: string[] = [];
  for (const paragraph of text.trim().split(/\n\s*\n/)) {
    const [first, ...rest] = paragraph.split("\n");
    if (/^[A-Z][A-Za-z ]*:$/.test(first) && rest.length > 0) {
      lines.push(".PP", `.B ${roff(first)}`, ".RS 4", ".nf");
      lines.push(...rest.map((line) => roff(line.replace(/^ {2}/, ""))));
      lines.push(".fi", ".RE");
    } else {
      lines.push(".PP", ...paragraph.split("\n").map((line) => roff(line.trim())));
    }
  }
  return lines;
}

function optionLines(option: OptionSpec, defaultText: string | undefined): string[] {
  const names = option.flags.map((flag) => `\\fB${roff(flag)}\\fR`).join(", ");
  const value = option.valueName === undefined ? "" : ` \\fI${roff(option.valueName)}\\fR`;
  const suffix = defaultText === undefined ? "" : ` (default: ${roff(defaultText)})`;
  return [".TP", `${names}${value}`, `${roff(option.description)}${suffix}`];
}

/** The default of each visible option, as `--help` shows it. */
function defaults(command: Command): Map<string, string> {
  const result = new Map<string, string>();
  for (const option of command.options) {
    const value = option.defaultValueDescription ??
      (option.defaultValue === undefined || Array.isArray(option.defaultValue) ||
          typeof option.defaultValue === "boolean"
        ? undefined
        : JSON.stringify(option.defaultValue));
    if (value !== undefined && option.long !== undefined) result.set(option.long, value);
  }
  return result;
}

const TIME_SECTION = [
  ".SH TIME AND DURATION",
  "A \\fITIME\\fR is one of:",
  ".IP \\(bu 2",
  "ISO 8601: \\fB2026\\-11\\-24T10:15:00Z\\fR, \\fB2026\\-11\\-24T10:15:00.250+01:00\\fR,",
  "\\fB'2026\\-11\\-24 10:15'\\fR (local time unless a zone is given; fractions of a second allowed)",
  ".IP \\(bu 2",
  "\\fBnow\\fR, or relative to now: \\fB\\-15m\\fR, \\fB\\-2h\\fR, \\fB\\-7d\\fR",
  ".IP \\(bu 2",
  "\\fB@\\fR\\fIunix\\-seconds\\fR, \\fBseq:\\fR\\fIn\\fR (after entry \\fIn\\fR),",
  "\\fBmark:\\fR\\fIname\\fR (a mark made by \\fBsectorlog mark\\fR)",
  ".PP",
  "A time outside the restorable window is refused with the window.",
  "A \\fIDURATION\\fR is a number with a unit: \\fB90s\\fR, \\fB15m\\fR, \\fB36h\\fR, \\fB7d\\fR.",
];

const EXIT_SECTION = [
  ".SH EXIT STATUS",
  ...[
    [EXIT_OK, "done"],
    [EXIT_FAILED, "failed (I/O, network)"],
    [EXIT_USAGE, "bad usage or bad input; the message names the argument"],
    [EXIT_INTEGRITY, "integrity problem found (verify, restore)"],
    [EXIT_BUSY, "busy: another process holds the logdir lock; the message names its pid"],
  ].flatMap(([code, meaning]) => [".TP", `.B ${code}`, `${meaning}`]),
];

const TAIL_SECTIONS = [
  ".SH OUTPUT",
  "Messages go to standard error. With \\fB\\-\\-json\\fR a command prints one machine\\-readable",
  "summary on standard output. Long work shows a progress bar only when standard error is a",
  "terminal.",
  ".SH ENVIRONMENT",
  ".TP",
  ".B SECTORLOG_DEBUG",
  "When set, errors are printed with their stack trace.",
  ".SH FILES",
  ".TP",
  "\\fIlogdir\\fR\\fB/lock\\fR",
  "Held (flock) by the one process that writes the logdir; holds its pid.",
  ".TP",
  ".I examples/systemd/",
  "In the source tree: systemd units for watch and receive, and timers for daily compact and",
  "verify.",
  ".TP",
  ".I examples/cron/sectorlog",
  "In the source tree: the same jobs as a cron file, for systems without systemd.",
  ".SH SEE ALSO",
  ".BR qemu\\-nbd (8),",
  ".BR nbd\\-client (8),",
  ".BR nbdcopy (1),",
  ".BR flock (1)",
];

/**
 * The whole man page of `program` in roff (man macros). Deterministic: the same definitions
 * give the same bytes, so CI can check that docs/sectorlog.1 is current.
 */
export function renderManPage(program: Command, options: { version: string }): string {
  const tree = commandTree(program);
  const name = program.name();
  const upper = name.toUpperCase();
  const help = program.createHelp();
  const lines = [
    `.\\" Generated from the command definitions by \`deno task man\`; do not edit.`,
    `.TH ${upper} 1 "" "${name} ${options.version}" "User Commands"`,
    ".SH NAME",
    `${name} \\- ${roff(program.description())}`,
    ".SH SYNOPSIS",
  ];
  for (const command of help.visibleCommands(program)) {
    lines.push(`.B ${name} ${command.name()}`, roff(usageOf(command)), ".br");
  }
  lines.push(`.B ${name}`, "\\fB\\-\\-version\\fR | \\fB\\-\\-help\\fR");
  lines.push(".SH DESCRIPTION");
  lines.push(
    `${roff(name)} is continuous, point\\-in\\-time backup for block devices. It stands between an`,
    "operating system and a disk as a \\fIlog\\-assisted disk\\fR: it passes every sector write to",
    "the disk and also stamps it with the time and appends it to a journal in a \\fIlogdir\\fR.",
    "With the logdir's base snapshot and that journal, the disk can be rebuilt exactly as it was",
    "at any moment. Journals can be shipped over TCP to a server that keeps the logs of many",
    "machines, compacted on a schedule, and restored by time.",
    ...renderAfterText(helpTextAfter(program)),
    ".SH OPTIONS",
  );
  const rootDefaults = defaults(program);
  for (const option of tree.root.options) {
    lines.push(...optionLines(option, rootDefaults.get(option.flags.at(-1)!)));
  }
  lines.push(".SH COMMANDS");
  for (const command of program.commands) {
    const spec = tree.commands.find((candidate) => candidate.name === command.name());
    if (spec === undefined) continue; // hidden
    lines.push(`.SS "${name} ${command.name()} ${roff(usageOf(command))}"`);
    lines.push(roff(spec.description));
    for (const argument of spec.arguments) {
      lines.push(".TP", `.I ${roff(argument.name)}`, roff(argument.description));
    }
    const commandDefaults = defaults(command);
    for (const option of spec.options) {
      lines.push(...optionLines(option, commandDefaults.get(option.flags.at(-1)!)));
    }
    lines.push(...renderAfterText(helpTextAfter(command)));
  }
  lines.push(...TIME_SECTION, ...EXIT_SECTION, ...TAIL_SECTIONS);
  return lines.join("\n") + "\n";
}

function usageOf(command: Command): string {
  return command.usage();
}
