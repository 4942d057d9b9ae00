/**
 * The man page docs/sectorlog.1: current with the command definitions (`deno task man` writes
 * it), naming every subcommand and flag, and free of roff warnings.
 */
import assert from "node:assert/strict";
import { buildProgram } from "../cli/main.ts";
import { currentManPage, MAN_PAGE_PATH } from "../scripts/man.ts";
import { run, skipReason } from "./_watch_harness.ts";

Deno.test("man page: docs/sectorlog.1 is what `deno task man` generates", async () => {
  const committed = await Deno.readTextFile(MAN_PAGE_PATH);
  assert.ok(
    committed === currentManPage(),
    "docs/sectorlog.1 is not current with the command definitions: run `deno task man`",
  );
});

Deno.test("man page: names every subcommand and every flag", () => {
  const page = currentManPage();
  const program = buildProgram();
  const help = program.createHelp();
  for (const command of [program, ...help.visibleCommands(program)]) {
    // The implicit `help [command]` is in the synopsis only.
    if (command !== program && command.name() !== "help") {
      assert.ok(page.includes(`.SS "sectorlog ${command.name()} `), `no section ${command.name()}`);
    }
    for (const option of help.visibleOptions(command)) {
      const long = option.long!.replaceAll("-", "\\-");
      assert.ok(page.includes(`\\fB${long}\\fR`), `${command.name()} ${option.long} missing`);
    }
  }
});

const GROFF = "man page: groff renders it without warnings";
Deno.test({
  name: GROFF,
  ignore: skipReason(GROFF, ["groff"]) !== undefined,
  fn: async () => {
    const result = await run("groff", ["-man", "-ww", "-z", MAN_PAGE_PATH]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stderr, "", `groff warnings:\n${result.stderr}`);
  },
});
