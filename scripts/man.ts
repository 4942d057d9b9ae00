/**
 * `deno task man`: writes the man page docs/sectorlog.1 from the command definitions of
 * cli/main.ts. `deno task man --check` writes nothing and exits 1 when the file is not current.
 */
import denoJson from "../deno.json" with { type: "json" };
import { renderManPage } from "../cli/_man.ts";
import { buildProgram } from "../cli/main.ts";

/** Where the man page lives in the repository. */
export const MAN_PAGE_PATH: string = new URL("../docs/sectorlog.1", import.meta.url).pathname;

/** The man page as the current command definitions render it. */
export function currentManPage(): string {
  return renderManPage(buildProgram(), { version: denoJson.version });
}

if (import.meta.main) {
  const page = currentManPage();
  if (Deno.args.includes("--check")) {
    const committed = await Deno.readTextFile(MAN_PAGE_PATH).catch(() => "");
    if (committed !== page) {
      console.error(
        `${MAN_PAGE_PATH} is not current with the command definitions: run \`deno task man\``,
      );
      Deno.exit(1);
    }
    console.error(`${MAN_PAGE_PATH} is current`);
  } else {
    await Deno.writeTextFile(MAN_PAGE_PATH, page);
    console.error(`wrote ${MAN_PAGE_PATH}`);
  }
}
