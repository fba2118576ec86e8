/**
 * Tells the server what the user saw and took: `dgls/didShowCompletion {item}` when a suggestion comes back for
 * the editor, and `dgls/didPartiallyAcceptCompletion {item, acceptedLength}` (UTF-16, from the item's start)
 * when an edit inserts a leading part of it (VS Code's accept word / accept line). A full accept runs the
 * item's own command on the server. Also waits the server's debounce hint before automatic requests.
 * Knows nothing about settings.
 */
import * as vscode from 'vscode';
import type { LanguageClient } from 'vscode-languageclient/node';

const DID_SHOW = 'dgls/didShowCompletion';
const DID_PARTIALLY_ACCEPT = 'dgls/didPartiallyAcceptCompletion';

interface Shown {
  uri: string;
  start: vscode.Position;
  text: string;
  item: Record<string, unknown>;
}

export class AcceptanceTracker implements vscode.Disposable {
  private shown: Shown | undefined;
  private readonly subscription: vscode.Disposable;

  constructor(
    private readonly client: () => LanguageClient | undefined,
    private readonly debounceMs: () => number,
  ) {
    this.subscription = vscode.workspace.onDidChangeTextDocument((event) => this.onChange(event));
  }

  /** Middleware for textDocument/inlineCompletion: debounce automatic requests, note what is shown. */
  async provide(
    document: vscode.TextDocument,
    position: vscode.Position,
    context: vscode.InlineCompletionContext,
    token: vscode.CancellationToken,
    next: (
      document: vscode.TextDocument,
      position: vscode.Position,
      context: vscode.InlineCompletionContext,
      token: vscode.CancellationToken,
    ) => vscode.ProviderResult<vscode.InlineCompletionItem[] | vscode.InlineCompletionList>,
  ): Promise<vscode.InlineCompletionItem[] | vscode.InlineCompletionList | null | undefined> {
    const wait = this.debounceMs();
    if (context.triggerKind === vscode.InlineCompletionTriggerKind.Automatic && wait > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, wait);
        token.onCancellationRequested(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      if (token.isCancellationRequested) {
        return null;
      }
    }
    const result = await next(document, position, context, token);
    const items = Array.isArray(result) ? result : result?.items ?? [];
    if (items.length > 0 && !token.isCancellationRequested) {
      this.noteShown(document, position, items[0]);
    }
    return result;
  }

  private noteShown(document: vscode.TextDocument, position: vscode.Position, item: vscode.InlineCompletionItem): void {
    const client = this.client();
    if (!client) {
      return;
    }
    const text = typeof item.insertText === 'string' ? item.insertText : item.insertText.value;
    const start = item.range?.start ?? position;
    const command = item.command as vscode.Command | undefined;
    const wire: Record<string, unknown> = {
      insertText: text,
      range: item.range ? client.code2ProtocolConverter.asRange(item.range) : undefined,
      command: command ? { title: command.title, command: command.command, arguments: command.arguments } : undefined,
    };
    this.shown = { uri: document.uri.toString(), start, text, item: wire };
    void client.sendNotification(DID_SHOW, { item: wire });
  }

  private onChange(event: vscode.TextDocumentChangeEvent): void {
    const shown = this.shown;
    const client = this.client();
    if (!shown || !client || event.document.uri.toString() !== shown.uri || event.contentChanges.length !== 1) {
      return;
    }
    const change = event.contentChanges[0];
    if (change.rangeLength !== 0 || change.text.length < 2 || change.range.start.isBefore(shown.start)) {
      return; // typing one character, deleting, or editing elsewhere: not an accept
    }
    const end = event.document.positionAt(event.document.offsetAt(change.range.start) + change.text.length);
    const taken = event.document.getText(new vscode.Range(shown.start, end));
    if (taken.length < shown.text.length && shown.text.startsWith(taken)) {
      void client.sendNotification(DID_PARTIALLY_ACCEPT, { item: shown.item, acceptedLength: taken.length });
    } else if (taken === shown.text) {
      this.shown = undefined; // the whole item: its command reports it
    }
  }

  dispose(): void {
    this.subscription.dispose();
  }
}
