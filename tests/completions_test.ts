/**
 * `sectorlog completions bash|zsh|fish`: each script parses in its shell and offers every visible
 * subcommand and flag of the command tree (compared against commander's own view of
 * `buildProgram()`, the same one `--help` prints), plus the words of arguments with choices.
 */
import assert from "node:assert/strict";
import type { Command } from "commander";
import { COMPLETION_SHELLS, completionScript } from "../cli/completions.ts";
import { buildProgram } from "../cli/main.ts";
import { run, runCli, runCliOk, skipReason, withTempDir } from "./_watch_harness.ts";
import { join } from "node:path";

/** Every visible subcommand with its visible flags (short and long), as `--help` lists them. */
function expectedTree(): Map<string, string[]> {
  const program = buildProgram();
  const help = program.createHelp();
  const flagsOf = (command: Command) =>
    help.visibleOptions(command).flatMap((option) => [option.short, option.long])
      .filter((flag): flag is string => flag !== undefined);
  const tree = new Map<string, string[]>([["", flagsOf(program)]]);
  for (const command of help.visibleCommands(program)) {
    tree.set(command.name(), flagsOf(command));
  }
  return tree;
}

Deno.test("completions: the tree has the subcommands and flags the CLI is known for", () => {
  const tree = expectedTree();
  for (const name of ["snapshot", "watch", "restore", "compact", "verify", "completions", "help"]) {
    assert.ok(tree.has(name), `no ${name} subcommand`);
  }
  assert.ok(tree.get("restore")!.includes("--at"));
  assert.ok(tree.get("")!.includes("--version"));
  assert.ok(!tree.get("receive")!.includes("--segment-bytes-max"), "hidden options stay hidden");
});

Deno.test("completions: `sectorlog completions SHELL` prints the generated script", async () => {
  for (const shell of COMPLETION_SHELLS) {
    const result = await runCliOk(["completions", shell]);
    assert.equal(result.stdout, completionScript(buildProgram(), shell).trimEnd() + "\n");
  }
  const bad = await runCli(["completions", "tcsh"]);
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /tcsh/);
});

/** Runs the bash completion function for each command line and returns COMPREPLY of each. */
async function bashCompletions(script: string, lines: string[][], cwd: string) {
  const driver = [
    script,
    "reply() {",
    '  COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()',
    "  _sectorlog",
    '  printf "%s\\n" "$(IFS=" "; echo "${COMPREPLY[*]}")"',
    "}",
    ...lines.map((words) => `reply ${words.map((w) => `'${w}'`).join(" ")}`),
  ].join("\n");
  const result = await run("bash", ["--norc", "-c", driver], { cwd });
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stderr, "", "the completion function prints no errors");
  const replies = result.stdout.split("\n").slice(0, lines.length);
  return replies.map((reply) => reply.split(" ").filter((word) => word !== ""));
}

const BASH = "completions: the bash script passes bash -n and completes every subcommand and flag";
Deno.test({
  name: BASH,
  ignore: skipReason(BASH, ["bash"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const script = completionScript(buildProgram(), "bash");
      const path = join(dir, "sectorlog.bash");
      await Deno.writeTextFile(path, script);
      const syntax = await run("bash", ["-n", path]);
      assert.equal(syntax.code, 0, syntax.stderr);

      const tree = expectedTree();
      const subcommands = [...tree.keys()].filter((name) => name !== "");
      await Deno.mkdir(join(dir, "logs"));
      await Deno.writeTextFile(join(dir, "disk.img"), "");
      const lines = [
        ["sectorlog", ""],
        ["sectorlog", "-"],
        ...subcommands.map((name) => ["sectorlog", name, "-"]),
        ["sectorlog", "completions", ""],
        ["sectorlog", "help", ""],
        ["sectorlog", "restore", "lo"], // <logdir>: directories only
        ["sectorlog", "snapshot", "di"], // <device>: files
        ["sectorlog", "restore", "logs", "--at", ""], // a TIME: no file names
        ["sectorlog", "receive", "logs", "--key-file", "di"],
      ];
      const replies = await bashCompletions(script, lines, dir);
      assert.deepEqual(replies[0].toSorted(), subcommands.toSorted());
      assert.deepEqual(replies[1].toSorted(), tree.get("")!.toSorted());
      subcommands.forEach((name, i) => {
        assert.deepEqual(replies[2 + i].toSorted(), tree.get(name)!.toSorted(), `${name} -<TAB>`);
      });
      const rest = replies.slice(2 + subcommands.length);
      assert.deepEqual(rest[0], [...COMPLETION_SHELLS]);
      assert.deepEqual(rest[1].toSorted(), subcommands.filter((n) => n !== "help").toSorted());
      assert.deepEqual(rest[2], ["logs"]);
      assert.deepEqual(rest[3], ["disk.img"]);
      assert.deepEqual(rest[4], []);
      assert.deepEqual(rest[5], ["disk.img"]);
    }),
});

const ZSH = "completions: the zsh script passes zsh -n and registers with compdef";
Deno.test({
  name: ZSH,
  ignore: skipReason(ZSH, ["zsh"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const script = completionScript(buildProgram(), "zsh");
      const path = join(dir, "_sectorlog");
      await Deno.writeTextFile(path, script);
      const syntax = await run("zsh", ["-n", path]);
      assert.equal(syntax.code, 0, syntax.stderr);
      const loaded = await run("zsh", [
        "-f",
        "-c",
        `autoload -U compinit && compinit -u -d ${dir}/zcompdump && source ${path} && ` +
        `print -r -- "$_comps[sectorlog]"`,
      ]);
      assert.equal(loaded.code, 0, loaded.stderr);
      assert.equal(loaded.stdout.trim(), "_sectorlog");
      for (const [name, flags] of expectedTree()) {
        if (name !== "") assert.ok(script.includes(`(${name})`), `zsh script lacks ${name}`);
        for (const flag of flags) {
          const listed = script.includes(`${flag}[`) || script.includes(`${flag}=[`);
          assert.ok(listed, `zsh script lacks ${flag}`);
        }
      }
    }),
});

const FISH = "completions: the fish script parses and completes every subcommand and flag";
Deno.test({
  name: FISH,
  ignore: skipReason(FISH, ["fish"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const path = join(dir, "sectorlog.fish");
      await Deno.writeTextFile(path, completionScript(buildProgram(), "fish"));
      const syntax = await run("fish", ["--no-execute", path]);
      assert.equal(syntax.code, 0, syntax.stderr);
      const tree = expectedTree();
      const lines = [
        "sectorlog ",
        ...[...tree.keys()].filter((n) => n).map((n) => `sectorlog ${n} -`),
      ];
      const script = [
        `source ${path}`,
        ...lines.map((line) => `complete -C '${line}' | string join ' '; echo '|'`),
      ].join("\n");
      const result = await run("fish", ["--no-config", "-c", script]);
      assert.equal(result.code, 0, result.stderr);
      const replies = result.stdout.split("|\n").map((block) =>
        block.split(/\s+/).filter((word) => /^(-|[a-z])/.test(word))
      );
      const subcommands = [...tree.keys()].filter((name) => name !== "");
      for (const name of subcommands) {
        assert.ok(replies[0].includes(name), `fish: sectorlog <TAB> lacks ${name}`);
      }
      subcommands.forEach((name, i) => {
        for (const flag of tree.get(name)!) {
          assert.ok(replies[1 + i].includes(flag), `fish: sectorlog ${name} -<TAB> lacks ${flag}`);
        }
      });
    }),
});
