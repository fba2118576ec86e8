/**
 * Settings: how to launch `dgls lsp`, and the server options sent as initializationOptions and
 * workspace/didChangeConfiguration. The option keys come from this extension's package.json
 * (`dgls.engine.*`, `dgls.deadlines.*`, `dgls.context.*`, `dgls.completion.*`), so there is one list of them;
 * only values the user set are sent, and the server applies its own defaults to the rest.
 * Knows nothing about the language client.
 */
import * as vscode from 'vscode';

export const SECTION = 'dgls';
const OPTION_GROUPS = ['engine', 'deadlines', 'context', 'completion'];
/** Settings whose change needs a new server process (the rest are pushed to the running server). */
export const LAUNCH_SETTINGS = ['dgls.server', 'dgls.trace'];

export interface Launch {
  command: string;
  args: string[];
}

/** `dgls lsp`, or `<python> -P -m dgls lsp` when dgls.server.pythonPath is set (-P: the workspace folder stays
 * off sys.path, so a project package named `dgls` or `engine` cannot shadow ours). */
export function launch(): Launch {
  const config = vscode.workspace.getConfiguration(SECTION);
  const extra = config.get<string[]>('server.extraArgs', []);
  const python = config.get<string>('server.pythonPath', '').trim();
  if (python) {
    return { command: expandHome(python), args: ['-P', '-m', 'dgls', 'lsp', ...extra] };
  }
  return { command: expandHome(config.get<string>('server.path', 'dgls').trim() || 'dgls'), args: ['lsp', ...extra] };
}

/** The same launch, with `lsp` swapped for another subcommand (e.g. `engine stop`). */
export function cliCommand(subcommand: string[]): Launch {
  const { command, args } = launch();
  const base = args.slice(0, args.indexOf('lsp'));
  const socket = serverOptions()['engine'] as Record<string, unknown> | undefined;
  const socketArgs = typeof socket?.['socket'] === 'string' ? ['--socket', expandHome(socket['socket'] as string)] : [];
  return { command, args: [...base, ...subcommand, ...socketArgs] };
}

/** Server options (camelCase, nested by group) with only the values the user set. */
export function serverOptions(): Record<string, unknown> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const declared = Object.keys(
    (vscode.extensions.getExtension('dgls.dgls')?.packageJSON?.contributes?.configuration?.properties ?? {}) as object,
  );
  const options: Record<string, Record<string, unknown>> = {};
  for (const key of declared) {
    const [, group, name] = key.split('.');
    if (!OPTION_GROUPS.includes(group) || !name) {
      continue;
    }
    const inspected = config.inspect(`${group}.${name}`);
    const value = inspected?.workspaceFolderValue ?? inspected?.workspaceValue ?? inspected?.globalValue;
    if (value !== undefined && value !== null && value !== '') {
      options[group] = options[group] ?? {};
      options[group][name] = name === 'model' || name === 'socket' ? expandHome(String(value)) : value;
    }
  }
  return options;
}

function expandHome(path: string): string {
  return path.startsWith('~/') ? `${process.env.HOME ?? ''}${path.slice(1)}` : path;
}
