/**
 * The examples in README.md and docs/*.md: every shell block marked runnable (an HTML comment
 * `<!-- runnable -->` or `<!-- runnable: needs tool, tool -->` on the line before its fence) runs
 * as written in a fresh temp dir with `sectorlog` on PATH, under `bash -euo pipefail`. Blocks that
 * need a real machine (devices, systemd, root) are not marked; their `sectorlog …` command lines
 * are still checked against the command tree.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { commandLineProblems, shellWords, writeCliWrapper } from "./_cli_lines.ts";
import { REPO_DIR, run, skipReason, withTempDir } from "./_watch_harness.ts";

/** How long one runnable block may take. */
const BLOCK_MS_MAX = 180_000;

/** A fenced code block of a markdown file. */
interface Block {
  file: string;
  line: number;
  language: string;
  code: string;
  /** Undefined unless marked runnable; then the tools it needs. */
  runnableNeeds?: string[];
}

function markdownFiles(): string[] {
  const docs = [...Deno.readDirSync(join(REPO_DIR, "docs"))]
    .filter((entry) => entry.isFile && entry.name.endsWith(".md"))
    .map((entry) => `docs/${entry.name}`)
    .sort();
  return ["README.md", ...docs];
}

function blocks(file: string): Block[] {
  const lines = Deno.readTextFileSync(join(REPO_DIR, file)).split("\n");
  const found: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w*)/.exec(lines[i]);
    if (open === null) continue;
    const start = i;
    let end = i + 1;
    while (end < lines.length && !lines[end].startsWith("```")) end++;
    let previous = start - 1;
    while (previous >= 0 && lines[previous].trim() === "") previous--;
    const marker = previous >= 0
      ? /^<!--\s*runnable(?::\s*needs\s+([^>]*?))?\s*-->$/.exec(lines[previous].trim())
      : null;
    found.push({
      file,
      line: start + 1,
      language: open[1],
      code: lines.slice(start + 1, end).join("\n"),
      runnableNeeds: marker === null
        ? undefined
        : (marker[1] ?? "").split(/[\s,]+/).filter((tool) => tool !== ""),
    });
    i = end;
  }
  return found;
}

const ALL_BLOCKS = markdownFiles().flatMap(blocks);
const SHELL_LANGUAGES = ["sh", "bash", "shell"];

Deno.test("examples: README.md has runnable shell blocks", () => {
  const runnable = ALL_BLOCKS.filter((b) => b.file === "README.md" && b.runnableNeeds);
  assert.ok(runnable.length > 0, "no block in README.md is marked <!-- runnable -->");
  for (const block of ALL_BLOCKS.filter((b) => b.runnableNeeds !== undefined)) {
    assert.ok(
      SHELL_LANGUAGES.includes(block.language),
      `${block.file}:${block.line}: runnable blocks are sh`,
    );
  }
});

for (const block of ALL_BLOCKS.filter((b) => b.runnableNeeds !== undefined)) {
  const name = `examples: ${block.file}:${block.line} runs as written`;
  Deno.test({
    name,
    ignore: skipReason(name, ["bash", ...block.runnableNeeds!]) !== undefined,
    fn: () =>
      withTempDir(async (dir) => {
        const bin = await writeCliWrapper(join(dir, ".bin"));
        const work = join(dir, "work");
        await Deno.mkdir(work);
        // Background jobs of a block that fails halfway must not outlive it.
        const script = `trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n` +
          `export PATH=${bin}:$PATH\n${block.code}\n`;
        const result = await run("bash", ["-euo", "pipefail", "-c", script], {
          cwd: work,
          timeoutMs: BLOCK_MS_MAX,
        });
        assert.equal(
          result.code,
          0,
          `${block.file}:${block.line} exited ${result.code}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`,
        );
      }),
  });
}

/** `sectorlog …` command lines of a shell block (continuations joined, comments dropped). */
function sectorlogCommandLines(code: string): string[] {
  const joined = code.replaceAll(/\\\n\s*/g, " ");
  const commands: string[] = [];
  for (const line of joined.split("\n")) {
    const withoutComment = line.replace(/(^|\s)#.*$/, "");
    for (const segment of withoutComment.split(/;|&&|\|\||\||\$\(|\)|&/)) {
      const text = segment.replace(/\d?>>?\s*\S+/g, "").trim();
      if (text.startsWith("sectorlog ") && !text.includes("…")) commands.push(text);
    }
  }
  return commands;
}

Deno.test("examples: every sectorlog command line in README and docs is valid", () => {
  let checked = 0;
  for (const block of ALL_BLOCKS) {
    if (!SHELL_LANGUAGES.includes(block.language)) continue;
    for (const command of sectorlogCommandLines(block.code)) {
      const problems = commandLineProblems(shellWords(command).slice(1));
      assert.deepEqual(problems, [], `${block.file}:${block.line}: ${command}`);
      checked++;
    }
  }
  assert.ok(checked > 10, `only ${checked} command lines found`);
});
