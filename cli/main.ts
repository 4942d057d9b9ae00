/**
 * The `sectorlog` command line: composes one command per subcommand and maps errors to the exit
 * codes of DESIGN.md (0 done, 1 failed, 2 bad usage, 3 integrity problem, 4 busy).
 *
 * @module
 */
import { Command } from "commander";
import denoJson from "../deno.json" with { type: "json" };
import { ENTRY_FORMAT_VERSION } from "../lib/format/entry.ts";
import { MANIFEST_FORMAT_VERSION } from "../lib/format/manifest.ts";
import { PROTOCOL_VERSION } from "../lib/ship/wire.ts";
import { reportError } from "./_errors.ts";
import { compactCommand } from "./compact.ts";
import { completionsCommand } from "./completions.ts";
import { diffCommand } from "./diff.ts";
import { logCommand } from "./log.ts";
import { markCommand } from "./mark.ts";
import { receiveCommand } from "./receive.ts";
import { restoreCommand } from "./restore.ts";
import { serveCommand } from "./serve.ts";
import { shipCommand } from "./ship.ts";
import { snapshotCommand } from "./snapshot.ts";
import { verifyCommand } from "./verify.ts";
import { watchCommand } from "./watch.ts";

/** Builds the whole command tree (also used to generate help, completions and the man page). */
export function buildProgram(): Command {
  const program = new Command("sectorlog")
    .description("continuous point-in-time backup for block devices")
    .version(
      `sectorlog ${denoJson.version} (logdir format ${MANIFEST_FORMAT_VERSION}, entry format ${ENTRY_FORMAT_VERSION}, ship protocol ${PROTOCOL_VERSION})`,
      "-V, --version",
    )
    .addHelpText(
      "after",
      "\nExample:\n  sectorlog snapshot disk.img ./log && sectorlog restore ./log out.img --at -15m\n" +
        "\nExit codes: 0 done, 1 failed, 2 bad usage or input, 3 integrity problem, 4 busy\n",
    );
  for (
    const command of [
      snapshotCommand(),
      watchCommand(),
      restoreCommand(),
      serveCommand(),
      diffCommand(),
      compactCommand(),
      logCommand(),
      verifyCommand(),
      markCommand(),
      shipCommand(),
      receiveCommand(),
      completionsCommand(),
    ]
  ) {
    program.addCommand(command);
  }
  applyToAll(program, (command) => {
    command.exitOverride();
    command.showHelpAfterError("(add --help for usage and an example)");
    command.configureOutput({
      outputError: (text, write) => write(`sectorlog: ${text.replace(/^error: /, "")}`),
    });
  });
  return program;
}

function applyToAll(command: Command, visit: (command: Command) => void): void {
  visit(command);
  for (const sub of command.commands) applyToAll(sub as Command, visit);
}

/** Runs the CLI with `args` and returns the exit code. */
export async function main(args: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(args, { from: "user" });
    return Deno.exitCode;
  } catch (error) {
    return reportError(error);
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
