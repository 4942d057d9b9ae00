/**
 * `sectorlog completions bash|zsh|fish`: a shell completion script generated from the command
 * tree itself (commander's own view of visible commands, options and arguments), so a new
 * subcommand or flag reaches all three shells and the man page without a list to keep up to date.
 *
 * @module
 */
import { Argument, Command, type Help, type Option } from "commander";
import { print } from "./_output.ts";

/** The shells `sectorlog completions` writes scripts for. */
export const COMPLETION_SHELLS = ["bash", "zsh", "fish"] as const;
/** One of {@linkcode COMPLETION_SHELLS}. */
export type CompletionShell = typeof COMPLETION_SHELLS[number];

/** What a word completes to: paths, directories, one of some words, or nothing. */
export type ValueKind =
  | { kind: "file" }
  | { kind: "directory" }
  | { kind: "none" }
  | { kind: "words"; words: string[] };

/** An option as completion scripts and the man page see it. */
export interface OptionSpec {
  /** Every spelling, short first: `["-h", "--help"]`. */
  flags: string[];
  description: string;
  /** The value's name (`file` of `--key-file <file>`), when the option takes one. */
  valueName?: string;
  value: ValueKind;
  /** True when the option may be given more than once (its default is a list). */
  repeatable: boolean;
}

/** A positional argument. */
export interface ArgumentSpec {
  name: string;
  description: string;
  required: boolean;
  variadic: boolean;
  value: ValueKind;
}

/** A command (the root or a subcommand) with what it accepts. */
export interface CommandSpec {
  name: string;
  description: string;
  options: OptionSpec[];
  arguments: ArgumentSpec[];
}

/** The root's own options and arguments, and each visible subcommand (`help` included). */
export interface CommandTree {
  root: CommandSpec;
  commands: CommandSpec[];
}

/**
 * Reads the visible command tree of `program` the way `--help` shows it: hidden options and
 * commands stay out, commander's implicit `help` command and `-h, --help` options are in.
 */
export function commandTree(program: Command): CommandTree {
  const help = program.createHelp();
  const subcommands = help.visibleCommands(program);
  const names = subcommands.map((command) => command.name());
  const commands = subcommands.map((command) => {
    const spec = commandSpec(command, help);
    // The implicit `help [command]` takes a subcommand name.
    if (command.name() === "help") {
      const others = names.filter((name) => name !== "help");
      for (const argument of spec.arguments) argument.value = { kind: "words", words: others };
    }
    return spec;
  });
  const root = commandSpec(program, help);
  root.arguments = [{
    name: "command",
    description: "subcommand",
    required: true,
    variadic: false,
    value: { kind: "words", words: names },
  }];
  return { root, commands };
}

function commandSpec(command: Command, help: Help): CommandSpec {
  return {
    name: command.name(),
    description: command.description(),
    options: help.visibleOptions(command).map(optionSpec),
    arguments: command.registeredArguments.map((argument) => ({
      name: argument.name(),
      description: argument.description,
      required: argument.required,
      variadic: argument.variadic,
      value: argument.argChoices === undefined
        ? valueKind(argument.name())
        : { kind: "words", words: [...argument.argChoices] },
    })),
  };
}

function optionSpec(option: Option): OptionSpec {
  const valueName = /[<[]([^>\]]+)[>\]]/.exec(option.flags)?.[1];
  const flags = [option.short, option.long].filter((flag) => flag !== undefined) as string[];
  let value: ValueKind = { kind: "none" };
  if (option.argChoices !== undefined) value = { kind: "words", words: [...option.argChoices] };
  else if (valueName !== undefined) value = valueKind(valueName);
  return {
    flags,
    description: option.description,
    valueName,
    value,
    repeatable: Array.isArray(option.defaultValue),
  };
}

/** Values named like paths complete to paths; `logdir`, `storedir` to directories. */
function valueKind(name: string): ValueKind {
  if (/dir$/.test(name)) return { kind: "directory" };
  if (/(file|path|device|output)$/.test(name)) return { kind: "file" };
  return { kind: "none" };
}

/** The completion script of `program` for `shell`. */
export function completionScript(program: Command, shell: CompletionShell): string {
  const tree = commandTree(program);
  const name = program.name();
  if (shell === "bash") return bashScript(name, tree);
  if (shell === "zsh") return zshScript(name, tree);
  return fishScript(name, tree);
}

/** Builds the `completions` command. */
export function completionsCommand(): Command {
  return new Command("completions")
    .description("print a shell completion script (bash, zsh or fish) on stdout")
    .addArgument(
      new Argument("<shell>", "shell to complete for").choices([...COMPLETION_SHELLS]),
    )
    .addHelpText(
      "after",
      "\nExamples:\n" +
        "  sectorlog completions bash > /etc/bash_completion.d/sectorlog\n" +
        "  sectorlog completions zsh > /usr/local/share/zsh/site-functions/_sectorlog\n" +
        "  sectorlog completions fish > ~/.config/fish/completions/sectorlog.fish\n",
    )
    .action((shell: CompletionShell, _flags: unknown, command: Command) => {
      const program = command.parent;
      if (program === null) throw new Error("completions must be a subcommand");
      print(completionScript(program, shell).trimEnd());
    });
}

// ---------------------------------------------------------------------------------------------
// bash

function bashValue(value: ValueKind): string {
  return value.kind === "words" ? `words:${value.words.join(" ")}` : value.kind;
}

function bashQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

function bashCase(spec: CommandSpec, label: string): string {
  const options = spec.options.flatMap((option) => option.flags);
  const valued = spec.options.filter((option) => option.valueName !== undefined).flatMap((
    option,
  ) => option.flags.map((flag) => bashQuote(`${flag}=${bashValue(option.value)}`)));
  const positional = spec.arguments.map((argument) => bashQuote(bashValue(argument.value)));
  const variadic = spec.arguments.at(-1)?.variadic === true ? 1 : 0;
  return [
    `    ${label})`,
    `      options=${bashQuote(options.join(" "))}`,
    `      valued=(${valued.join(" ")})`,
    `      positional=(${positional.join(" ")})`,
    `      variadic=${variadic}`,
    `      ;;`,
  ].join("\n");
}

function bashScript(name: string, tree: CommandTree): string {
  const fn = `_${name.replaceAll("-", "_")}`;
  return `# bash completion for ${name}, generated from its command definitions by
# \`${name} completions bash\` (do not edit). Install:
#   ${name} completions bash > /etc/bash_completion.d/${name}
# or for one shell: source <(${name} completions bash)

${fn}_values() {
  case "$1" in
    file) mapfile -t COMPREPLY < <(compgen -f -- "$2"); compopt -o filenames 2>/dev/null ;;
    directory) mapfile -t COMPREPLY < <(compgen -d -- "$2"); compopt -o filenames 2>/dev/null ;;
    words:*) mapfile -t COMPREPLY < <(compgen -W "\${1#words:}" -- "$2") ;;
    *) COMPREPLY=() ;;
  esac
}

${fn}() {
  COMPREPLY=()
  local cur="\${COMP_WORDS[COMP_CWORD]}" prev="" i word entry
  ((COMP_CWORD > 0)) && prev="\${COMP_WORDS[COMP_CWORD - 1]}"
  # "--opt=value": bash splits it into "--opt", "=", "value".
  if [[ "$cur" == "=" ]]; then
    cur=""
  elif [[ "$prev" == "=" ]] && ((COMP_CWORD > 1)); then
    prev="\${COMP_WORDS[COMP_CWORD - 2]}"
  fi
  # The subcommand is the first word after the program name that is not an option.
  local command="" command_index=0
  for ((i = 1; i < COMP_CWORD; i++)); do
    word="\${COMP_WORDS[i]}"
    if [[ "$word" != -* ]]; then
      command="$word"
      command_index=$i
      break
    fi
  done
  local options="" variadic=0
  local -a valued=() positional=()
  case "$command" in
${bashCase(tree.root, '""')}
${tree.commands.map((spec) => bashCase(spec, spec.name)).join("\n")}
    *) return 0 ;;
  esac
  for entry in "\${valued[@]}"; do
    if [[ "$prev" == "\${entry%%=*}" ]]; then
      ${fn}_values "\${entry#*=}" "$cur"
      return 0
    fi
  done
  if [[ "$cur" == -* ]]; then
    mapfile -t COMPREPLY < <(compgen -W "$options" -- "$cur")
    return 0
  fi
  # Which positional argument the cursor is on: count the words before it that are neither
  # options nor option values.
  local count=0 skip=0
  for ((i = command_index + 1; i < COMP_CWORD; i++)); do
    word="\${COMP_WORDS[i]}"
    if ((skip)); then
      skip=0
      [[ "$word" == "=" ]] && skip=1
      continue
    fi
    if [[ "$word" == -* ]]; then
      for entry in "\${valued[@]}"; do
        [[ "$word" == "\${entry%%=*}" ]] && skip=1
      done
      continue
    fi
    count=$((count + 1))
  done
  if ((count >= \${#positional[@]})); then
    ((variadic)) || return 0
    count=$((\${#positional[@]} - 1))
  fi
  ((count >= 0)) && ${fn}_values "\${positional[count]}" "$cur"
  return 0
}

complete -F ${fn} ${name}
`;
}

// ---------------------------------------------------------------------------------------------
// zsh

function zshQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** Text inside `[...]` of an _arguments spec. */
function zshBracket(text: string): string {
  return text.replaceAll("\\", "\\\\").replaceAll("[", "\\[").replaceAll("]", "\\]");
}

/** Text between colons of an _arguments spec or a _describe entry. */
function zshColon(text: string): string {
  return text.replaceAll("\\", "\\\\").replaceAll(":", "\\:");
}

function zshAction(value: ValueKind): string {
  if (value.kind === "file") return "_files";
  if (value.kind === "directory") return "_files -/";
  if (value.kind === "words") return `(${value.words.join(" ")})`;
  return " ";
}

function zshArguments(spec: CommandSpec, indent: string): string[] {
  const specs: string[] = [];
  for (const option of spec.options) {
    for (const flag of option.flags) {
      const repeat = option.repeatable ? "*" : "";
      let text = `${repeat}${flag}${option.valueName === undefined ? "" : "="}[${
        zshBracket(option.description)
      }]`;
      if (option.valueName !== undefined) {
        text += `:${zshColon(option.valueName)}:${zshAction(option.value)}`;
      }
      specs.push(zshQuote(text));
    }
  }
  spec.arguments.forEach((argument, index) => {
    const position = argument.variadic ? "*" : `${index + 1}`;
    const optional = argument.required ? "" : ":";
    specs.push(
      zshQuote(
        `${position}:${optional}${zshColon(argument.name)}:${zshAction(argument.value)}`,
      ),
    );
  });
  return specs.map((text) => `${indent}${text}`);
}

function zshScript(name: string, tree: CommandTree): string {
  const fn = `_${name.replaceAll("-", "_")}`;
  const rootSpecs = zshArguments({ ...tree.root, arguments: [] }, "    ");
  const commands = tree.commands.map((spec) =>
    `    ${zshQuote(`${zshColon(spec.name)}:${zshColon(spec.description)}`)}`
  );
  const cases = tree.commands.map((spec) => {
    const specs = zshArguments(spec, "          ");
    return [
      `      (${spec.name})`,
      specs.length === 0
        ? "        ;;"
        : `        _arguments -s \\\n${specs.join(" \\\n")}\n        ;;`,
    ].join("\n");
  });
  return `#compdef ${name}
# zsh completion for ${name}, generated from its command definitions by
# \`${name} completions zsh\` (do not edit). Install into a directory on $fpath:
#   ${name} completions zsh > /usr/local/share/zsh/site-functions/_${name}
# or for one shell (after compinit): source <(${name} completions zsh)

${fn}() {
  local curcontext="$curcontext" state state_descr line
  typeset -A opt_args
  local -a commands
  commands=(
${commands.join("\n")}
  )
  _arguments -C -s \\
${rootSpecs.join(" \\\n")} \\
    '1:command:->command' \\
    '*::argument:->argument' && return 0
  case $state in
    (command)
      _describe -t commands '${name} command' commands
      ;;
    (argument)
      curcontext="\${curcontext%:*:*}:${name}-$line[1]:"
      case $line[1] in
${cases.join("\n")}
      esac
      ;;
  esac
}

if [[ "\${funcstack[1]}" == "${fn}" ]]; then
  ${fn} "$@"
else
  compdef ${fn} ${name}
fi
`;
}

// ---------------------------------------------------------------------------------------------
// fish

function fishQuote(text: string): string {
  return `'${text.replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`;
}

function fishValue(value: ValueKind): string {
  if (value.kind === "file") return "-F";
  if (value.kind === "directory") return "-f -a '(__fish_complete_directories)'";
  if (value.kind === "words") return `-f -a ${fishQuote(value.words.join(" "))}`;
  return "-f";
}

function fishOptions(name: string, spec: CommandSpec, condition: string): string[] {
  return spec.options.map((option) => {
    const flags = option.flags.map((flag) =>
      flag.startsWith("--") ? `-l ${flag.slice(2)}` : `-s ${flag.slice(1)}`
    );
    const value = option.valueName === undefined ? "" : ` -r ${fishValue(option.value)}`;
    return `complete -c ${name} -n ${condition} ${flags.join(" ")}${value} -d ${
      fishQuote(option.description)
    }`;
  });
}

function fishScript(name: string, tree: CommandTree): string {
  const lines = [
    `# fish completion for ${name}, generated from its command definitions by`,
    `# \`${name} completions fish\` (do not edit). Install:`,
    `#   ${name} completions fish > ~/.config/fish/completions/${name}.fish`,
    "",
    `complete -c ${name} -f`,
    ...fishOptions(name, tree.root, "__fish_use_subcommand"),
    ...tree.commands.map((spec) =>
      `complete -c ${name} -n __fish_use_subcommand -a ${spec.name} -d ${
        fishQuote(spec.description)
      }`
    ),
  ];
  for (const spec of tree.commands) {
    const condition = fishQuote(`__fish_seen_subcommand_from ${spec.name}`);
    lines.push(...fishOptions(name, spec, condition));
    // fish cannot tell positions apart: offer what any of the arguments takes.
    for (const argument of spec.arguments) {
      if (argument.value.kind === "none") continue;
      lines.push(
        `complete -c ${name} -n ${condition} ${fishValue(argument.value)} -d ${
          fishQuote(argument.description || argument.name)
        }`,
      );
    }
  }
  return lines.join("\n") + "\n";
}
