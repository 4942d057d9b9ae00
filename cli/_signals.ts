/**
 * How long-running commands (watch, receive, serve) wait to be stopped.
 *
 * @module
 */

/**
 * Resolves on the first SIGINT or SIGTERM, or when `alsoWhen` settles (the server ended on its
 * own), whichever comes first; removes its signal listeners either way.
 */
export function waitForStopSignal(alsoWhen?: Promise<unknown>): Promise<void> {
  return new Promise((resolve) => {
    const stop = () => {
      Deno.removeSignalListener("SIGINT", stop);
      Deno.removeSignalListener("SIGTERM", stop);
      resolve();
    };
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
    alsoWhen?.then(stop, stop);
  });
}
