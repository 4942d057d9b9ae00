/** `sectorlog mark <logdir> <name>`: a named point in time. */
import { Command } from "commander";
import { addMark } from "../lib/mark.ts";
import { formatTimeBoth, printJson, say } from "./_output.ts";

/** Builds the `mark` command. */
export function markCommand(): Command {
  return new Command("mark")
    .description(
      "append a named point in time (works while watch runs, through its control socket)",
    )
    .argument("<logdir>", "log directory")
    .argument("<name>", "mark name, e.g. before-upgrade")
    .option("--json", "print a JSON summary on stdout")
    .addHelpText(
      "after",
      "\nExample:\n  sectorlog mark /var/lib/sectorlog/vm1 before-upgrade\n" +
        "  sectorlog restore /var/lib/sectorlog/vm1 /tmp/old.img --at mark:before-upgrade\n",
    )
    .action(async (logdir: string, name: string, flags: { json?: boolean }) => {
      const mark = await addMark(logdir, name);
      if (flags.json === true) {
        printJson({ command: "mark", logdir, ...mark });
        return;
      }
      say(
        `mark ${JSON.stringify(name)} at seq ${mark.seq}, ${
          formatTimeBoth(mark.timeUs)
        } (via ${mark.via})`,
      );
    });
}
