--- dgls: Neovim client for the dgls language server (inline completions from a diffusion model).
---
--- `require('dgls').setup(opts)` merges options (see dgls.config), starts `dgls lsp` for the configured
--- filetypes and wires inline completion (dgls.completion) and commands (dgls.commands). This module owns
--- the client lifecycle and the last `dgls/status`; it knows nothing about how ghost text is drawn.

local config = require('dgls.config')

local M = {}

M.name = 'dgls'
---@type table<integer, table> last dgls/status params per client id
M.status = {}

local augroup = vim.api.nvim_create_augroup('dgls', { clear = true })

---@param msg string
---@param level? integer
function M.notify(msg, level)
  vim.notify('[dgls] ' .. msg, level or vim.log.levels.INFO)
end

--- The dgls client attached to `bufnr` (default: current buffer), if any.
---@param bufnr? integer
---@return vim.lsp.Client?
function M.client(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  return get({ name = M.name, bufnr = bufnr })[1]
end

--- client:request on 0.11+, client.request on 0.10.
function M.request(client, method, params, handler, bufnr)
  if vim.fn.has('nvim-0.11') == 1 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

--- client:cancel_request on 0.11+, client.cancel_request on 0.10.
function M.cancel_request(client, id)
  if vim.fn.has('nvim-0.11') == 1 then
    return client:cancel_request(id)
  end
  return client.cancel_request(id)
end

--- client:stop on 0.11+, client.stop on 0.10.
function M.stop(client, force)
  if vim.fn.has('nvim-0.11') == 1 then
    return client:stop(force)
  end
  return client.stop(force)
end

function M.send_notification(client, method, params)
  if vim.fn.has('nvim-0.11') == 1 then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

local function on_status(_, params, ctx)
  local previous = M.status[ctx.client_id] or {}
  M.status[ctx.client_id] = params
  -- The server reports failures itself (window/showMessage); say when the model becomes usable.
  if config.options.notify_status and params.state ~= previous.state and params.state == 'ready'
    and previous.state ~= nil then
    M.notify(('engine ready: %s'):format(vim.fn.fnamemodify(tostring(params.model or '?'), ':t')))
  end
  vim.api.nvim_exec_autocmds('User', { pattern = 'DglsStatus', modeline = false, data = params })
end

--- One line for a statusline: "dgls: ready · model · 42 ms".
---@return string
function M.statusline()
  local client = M.client()
  local status = client and M.status[client.id]
  if not status then
    return client and 'dgls' or ''
  end
  local parts = { 'dgls: ' .. (status.state or '?') }
  if status.model then
    table.insert(parts, vim.fn.fnamemodify(tostring(status.model), ':t'))
  end
  local latency = status.lastLatencyMs
  if type(latency) == 'number' then
    table.insert(parts, ('%d ms'):format(latency))
  end
  return table.concat(parts, ' · ')
end

local function root_dir(bufnr)
  local name = vim.api.nvim_buf_get_name(bufnr)
  local found = vim.fs.find(config.options.root_markers, { path = vim.fs.dirname(name), upward = true })[1]
  return found and vim.fs.dirname(found) or vim.fs.dirname(name)
end

--- Start (or reuse) the dgls client for `bufnr`.
---@param bufnr integer
---@return integer? client_id
function M.attach(bufnr)
  local opts = config.options
  if vim.bo[bufnr].buftype ~= '' or vim.api.nvim_buf_get_name(bufnr) == '' then
    return nil
  end
  if vim.fn.executable(opts.cmd[1]) ~= 1 then
    M.notify(('server command %q not found; set cmd in setup() (:checkhealth dgls)'):format(opts.cmd[1]),
      vim.log.levels.ERROR)
    return nil
  end
  return vim.lsp.start({
    name = M.name,
    cmd = opts.cmd,
    root_dir = root_dir(bufnr),
    init_options = opts.server,
    settings = { dgls = opts.server },
    handlers = { ['dgls/status'] = on_status },
    on_init = function(client)
      -- textDocument/completion is the server's fallback for clients without ghost text; with ghost text on it
      -- would only repeat the suggestion in completion menus (nvim-cmp, vim.lsp.completion) at an engine call each.
      if opts.inline.enabled then
        client.server_capabilities.completionProvider = nil
      end
    end,
    on_attach = function(client, attached)
      require('dgls.completion').attach(client, attached)
    end,
  }, { bufnr = bufnr })
end

--- Send the current server options to running clients (workspace/didChangeConfiguration).
function M.push_settings()
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  for _, client in ipairs(get({ name = M.name })) do
    client.settings = { dgls = config.options.server }
    M.send_notification(client, 'workspace/didChangeConfiguration', { settings = client.settings })
  end
end

--- Stop every dgls client and start them again on their buffers.
function M.restart()
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  local buffers = {}
  for _, client in ipairs(get({ name = M.name })) do
    for bufnr in pairs(client.attached_buffers) do
      table.insert(buffers, bufnr)
    end
    M.stop(client, true)
  end
  vim.defer_fn(function()
    for _, bufnr in ipairs(buffers) do
      if vim.api.nvim_buf_is_valid(bufnr) then
        M.attach(bufnr)
      end
    end
  end, 500)
end

---@param opts? table see dgls.config.defaults
function M.setup(opts)
  config.setup(opts)
  vim.api.nvim_clear_autocmds({ group = augroup })
  vim.api.nvim_create_autocmd('FileType', {
    group = augroup,
    pattern = config.options.filetypes,
    callback = function(args)
      M.attach(args.buf)
    end,
  })
  require('dgls.completion').setup()
  -- Buffers already open when setup() runs (lazy loading).
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) and vim.tbl_contains(config.options.filetypes, vim.bo[bufnr].filetype) then
      M.attach(bufnr)
    end
  end
  M.push_settings()
end

return M
