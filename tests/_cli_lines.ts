/**
 * Helpers for tests of examples written for people (README, systemd units, cron): a `sectorlog`
 * on PATH that runs this checkout's CLI, and a check of a written `sectorlog …` command line
 * against the command tree (the subcommand exists, every flag is one of its options, option
 * values are present and the argument count fits), for examples that cannot run in a test.
 *
 * @module
 */
import type { Command } from "commander";
import { join } from "node:path";
import { buildProgram } from "../cli/main.ts";
import { CLI_MAIN, REPO_DIR } from "./_watch_harness.ts";

/** Writes `dir/sectorlog`, a script that runs this checkout's CLI; returns `dir`. */
export async function writeCliWrapper(dir: string): Promise<string> {
  const quote = (text: string) => `'${text.replaceAll("'", `'\\''`)}'`;
  const script = `#!/bin/sh\nexec ${quote(Deno.execPath())} run -A --config ${
    quote(join(REPO_DIR, "deno.json"))
  } ${quote(CLI_MAIN)} "$@"\n`;
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(join(dir, "sectorlog"), script, { mode: 0o755 });
  return dir;
}

/** Splits a shell command line into words (quotes removed; no expansion). */
export function shellWords(line: string): string[] {
  const words: string[] = [];
  for (const match of line.matchAll(/"((?:[^"\\]|\\.)*)"|'([^']*)'|(\S+)/g)) {
    words.push(match[1] ?? match[2] ?? match[3]);
  }
  return words;
}

/**
 * What is wrong with `sectorlog <words…>` as a command line of this CLI (empty when nothing is):
 * `words` start after the program name.
 */
export function commandLineProblems(words: string[]): string[] {
  const program = buildProgram();
  const [name, ...rest] = words;
  if (name?.startsWith("-")) {
    const root = [...program.options.flatMap((o) => [o.long, o.short]), "--help", "-h"];
    return root.includes(name) ? [] : [`unknown option ${name}`];
  }
  const command = program.commands.find((c) => c.name() === name) as Command | undefined;
  if (command === undefined) return [`unknown subcommand ${JSON.stringify(name)}`];
  const problems: string[] = [];
  const options = command.options;
  let positional = 0;
  for (let i = 0; i < rest.length; i++) {
    const word = rest[i];
    if (word.startsWith("-") && word !== "-") {
      const flag = word.split("=")[0];
      const option = options.find((o) => o.long === flag || o.short === flag);
      if (flag === "--help" || flag === "-h") continue;
      if (option === undefined) {
        problems.push(`${name}: unknown option ${flag}`);
      } else if (option.required && !word.includes("=")) {
        if (i + 1 >= rest.length) problems.push(`${name}: ${flag} needs a value`);
        i++;
      }
      continue;
    }
    positional++;
  }
  const args = command.registeredArguments;
  const required = args.filter((a) => a.required).length;
  const variadic = args.some((a) => a.variadic);
  if (positional < required || (!variadic && positional > args.length)) {
    problems.push(`${name}: ${positional} arguments, expected ${required} to ${args.length}`);
  }
  return problems;
}
