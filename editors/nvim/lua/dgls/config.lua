--- dgls.config: the documented defaults and the merge of the user's options over them.
--- Knows nothing about LSP clients or buffers; every other module reads `require('dgls.config').options`.

local M = {}

---@class dgls.Keymaps
---@field accept string|false        Accept the whole suggestion (falls back to the key itself).
---@field accept_word string|false   Accept the next word of the suggestion.
---@field accept_line string|false   Accept the rest of the current line of the suggestion.
---@field next string|false          Show the next candidate (asks the server for several).
---@field prev string|false          Show the previous candidate.
---@field dismiss string|false       Hide the suggestion.

M.defaults = {
  -- Command that serves LSP on stdio. Use { '/path/to/venv/bin/python', '-P', '-m', 'dgls', 'lsp' } for a venv
  -- (-P keeps the project's own folders off sys.path).
  cmd = { 'dgls', 'lsp' },
  -- Filetypes the server is started for.
  filetypes = { 'python', 'javascript', 'typescript', 'go', 'rust', 'java', 'c', 'cpp', 'lua', 'sh' },
  -- Files or directories that mark a project root; the file's directory is used when none is found.
  root_markers = { '.git', 'pyproject.toml', 'package.json', 'go.mod', 'Cargo.toml' },
  -- Server options, sent verbatim as initializationOptions and workspace/didChangeConfiguration, camelCase as
  -- the server reads them (docs_lsp.md), e.g.
  --   engine = { model = '~/models/dg', socket = '/tmp/dgls.sock', device = 'auto', dtype = 'auto', start = true,
  --              idleTimeout = nil, loadTimeout = 300 },
  --   deadlines = { automaticMs = 150, invokedMs = 2000, rewriteMs = 10000 },
  --   context = { prefixTokens = 256, suffixTokens = 128, extraTokens = 256 },
  --   completion = { languages = { '*' }, candidates = 3, debounceMs = 75, mode = 'auto', seed = 0,
  --                  prefetch = true },
  server = {},
  inline = {
    enabled = true,
    -- 'auto': vim.lsp.inline_completion on Neovim >= 0.12, else ghost text drawn by dgls ('extmarks').
    backend = 'auto',
    -- Debounce before an automatic request, in ms (extmarks backend; 0.12 debounces itself).
    -- nil: the server's hint (server option completion.debounceMs, sent in dgls/status).
    debounce_ms = nil,
    -- Highlight group of the ghost text (extmarks backend; 0.12 uses ComplHint).
    hl_group = 'ComplHint',
  },
  ---@type dgls.Keymaps
  keymaps = {
    accept = '<Tab>',
    accept_word = '<M-Right>',
    accept_line = '<M-Down>',
    next = '<M-]>',
    prev = '<M-[>',
    dismiss = '<C-]>',
  },
  -- Say "[dgls] engine ready: <model>" when the engine becomes ready after starting or restarting.
  notify_status = true,
}

M.options = vim.deepcopy(M.defaults)

--- Merge `opts` over the defaults; unknown keys are reported once and ignored.
---@param opts? table
---@return table
function M.setup(opts)
  opts = opts or {}
  for key in pairs(opts) do
    if M.defaults[key] == nil then
      vim.notify(('[dgls] unknown option %q ignored'):format(key), vim.log.levels.WARN)
      opts[key] = nil
    end
  end
  M.options = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts)
  -- Lists replace, they do not merge index by index.
  for _, key in ipairs({ 'cmd', 'filetypes', 'root_markers' }) do
    if opts[key] ~= nil then
      M.options[key] = opts[key]
    end
  end
  if type(M.options.cmd) == 'string' then
    M.options.cmd = { M.options.cmd }
  end
  return M.options
end

return M
