/**
 * dgls for VS Code: starts `dgls lsp` with vscode-languageclient and wires its inline completions (the
 * client's LSP 3.18 inline completion feature, VS Code's cancellation token passed through), the commands
 * "dgls: Fill Selection", "dgls: Rewrite Selection…", "dgls: Restart Engine" and "dgls: Show Log", the status
 * bar item and the output channel. Settings changes restart the client (launch settings) or are pushed to the
 * running server (server options).
 */
import { execFile } from 'node:child_process';
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  type LanguageClientOptions,
  type ServerOptions,
} from 'vscode-languageclient/node';

import { AcceptanceTracker } from './acceptance';
import { cliCommand, LAUNCH_SETTINGS, launch, SECTION, serverOptions } from './settings';
import { type EngineStatus, StatusBar } from './statusBar';

const COMMANDS = {
  fill: 'dgls.editor.fillSelection',
  rewrite: 'dgls.editor.rewriteSelection',
  restartEngine: 'dgls.editor.restartEngine',
  showLog: 'dgls.editor.showLog',
};
const SERVER_FILL = 'dgls.fillSelection';
const SERVER_REWRITE = 'dgls.rewriteSelection';

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let statusBar: StatusBar;
let tracker: AcceptanceTracker;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel('dgls', { log: true });
  statusBar = new StatusBar(COMMANDS.showLog);
  tracker = new AcceptanceTracker(
    () => client,
    () => (typeof statusBar.last.debounceMs === 'number' ? statusBar.last.debounceMs : 0),
  );
  context.subscriptions.push(
    output,
    statusBar,
    tracker,
    vscode.commands.registerCommand(COMMANDS.fill, () => runOnSelection(SERVER_FILL)),
    vscode.commands.registerCommand(COMMANDS.rewrite, () => rewriteSelection()),
    vscode.commands.registerCommand(COMMANDS.restartEngine, () => restartEngine()),
    vscode.commands.registerCommand(COMMANDS.showLog, () => output.show(true)),
    vscode.workspace.onDidChangeConfiguration((event) => onConfigurationChanged(event)),
  );
  await startClient();
}

export async function deactivate(): Promise<void> {
  await stopClient();
}

async function startClient(): Promise<void> {
  const { command, args } = launch();
  output.info(`starting ${command} ${args.join(' ')}`);
  // No `transport`: the client speaks over the process's stdio without adding a --stdio argument.
  const server: ServerOptions = { command, args };
  const options: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    outputChannel: output,
    initializationOptions: serverOptions(),
    middleware: {
      provideInlineCompletionItems: (document, position, context, token, next) =>
        tracker.provide(document, position, context, token, next),
      // The server's textDocument/completion is a fallback for editors without inline completion; here it would
      // only repeat the ghost text in the suggest widget and cost an engine call per keystroke.
      provideCompletionItem: () => undefined,
    },
  };
  const created = new LanguageClient('dgls', 'dgls', server, options);
  created.onNotification('dgls/status', (status: EngineStatus) => statusBar.show(status));
  client = created;
  try {
    await created.start();
  } catch (error) {
    statusBar.show({ state: 'failed', message: String(error) });
    output.info(`could not start the server: ${error}`);
    void vscode.window
      .showErrorMessage(`[dgls] could not start "${command}": set dgls.server.path or dgls.server.pythonPath`, 'Show Log')
      .then((choice) => choice && output.show(true));
  }
}

async function stopClient(): Promise<void> {
  const running = client;
  client = undefined;
  if (running) {
    try {
      await running.stop();
    } catch (error) {
      output.info(`stopping the server: ${error}`);
    }
  }
}

async function restartClient(): Promise<void> {
  await stopClient();
  statusBar.show({ state: 'starting' });
  await startClient();
}

function onConfigurationChanged(event: vscode.ConfigurationChangeEvent): void {
  if (!event.affectsConfiguration(SECTION)) {
    return;
  }
  if (LAUNCH_SETTINGS.some((key) => event.affectsConfiguration(key)) || !client?.isRunning()) {
    output.info('settings changed: restarting the server');
    void restartClient();
    return;
  }
  output.info('settings changed: sending them to the server');
  void client.sendNotification(DidChangeConfigurationNotification.type, { settings: { dgls: serverOptions() } });
}

async function rewriteSelection(): Promise<void> {
  const instruction = await vscode.window.showInputBox({
    title: 'dgls: Rewrite Selection',
    prompt: 'Instruction (optional): how to change the selected code',
    placeHolder: 'e.g. use a list comprehension; press Enter for none',
  });
  if (instruction === undefined) {
    return; // Escape
  }
  await runOnSelection(SERVER_REWRITE, instruction);
}

/** Send dgls.fillSelection / dgls.rewriteSelection; the server applies the result with workspace/applyEdit. */
async function runOnSelection(command: string, instruction = ''): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  const running = client;
  if (!editor || editor.selection.isEmpty) {
    void vscode.window.showWarningMessage('[dgls] select the code to fill or rewrite first');
    return;
  }
  if (!running?.isRunning()) {
    void vscode.window.showWarningMessage('[dgls] the language server is not running (dgls: Show Log)');
    return;
  }
  const argument = {
    uri: editor.document.uri.toString(),
    range: running.code2ProtocolConverter.asRange(editor.selection),
    version: editor.document.version,
    instruction,
  };
  const title = command === SERVER_FILL ? 'dgls: filling the selection' : 'dgls: rewriting the selection';
  await vscode.window.withProgress(
    { location: vscode.ProgressLocation.Notification, title, cancellable: true },
    async (_progress, token) => {
      try {
        const result = (await running.sendRequest(
          ExecuteCommandRequest.type,
          { command, arguments: [argument] },
          token,
        )) as { applied?: boolean; reason?: string } | null;
        if (result && result.applied === false && !token.isCancellationRequested) {
          void vscode.window.showWarningMessage(`[dgls] ${result.reason ?? 'nothing was applied'}`);
        }
      } catch (error) {
        if (!token.isCancellationRequested) {
          output.info(`${command} failed: ${error}`);
          void vscode.window.showErrorMessage(`[dgls] ${command} failed: ${error}`);
        }
      }
    },
  );
}

/** `dgls engine stop`, then a new server, which starts the engine again with the current settings. */
async function restartEngine(): Promise<void> {
  const { command, args } = cliCommand(['engine', 'stop']);
  output.info(`${command} ${args.join(' ')}`);
  await new Promise<void>((resolve) => {
    execFile(command, args, { timeout: 30_000 }, (error, stdout, stderr) => {
      output.info(`${(stdout + stderr).trim()}${error ? ` (${error.message})` : ''}`);
      resolve();
    });
  });
  await restartClient();
}
