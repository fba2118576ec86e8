--- dgls.completion.extmarks: ghost text drawn by dgls (Neovim 0.10/0.11, or inline.backend = 'extmarks'):
--- debounced textDocument/inlineCompletion requests, the first line drawn inline and the rest as virtual lines,
--- kept while the user types through it. Knows nothing about vim.lsp.inline_completion.

local config = require('dgls.config')
local position = require('dgls.position')
local shared = require('dgls.completion.shared')

local api = vim.api
local M = {}

local ns = api.nvim_create_namespace('dgls.ghost')
local augroup = api.nvim_create_augroup('dgls.completion.extmarks', { clear = true })

--- Per-buffer state: items, index, where they were asked for, the pending request and the debounce timer.
---@type table<integer, table>
local state = {}

local function clear(bufnr)
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
end

local function current(bufnr)
  local s = state[bufnr]
  return s and s.items and s.items[s.index] or nil, s
end

--- Where the item starts (row, byte col), or nil for "at the cursor where it was requested".
local function item_start(bufnr, s, item)
  if item.range then
    return position.from_lsp(bufnr, item.range.start, s.encoding)
  end
  return s.row, s.col
end

local function ghost_of(bufnr)
  local item, s = current(bufnr)
  if not item then
    return nil
  end
  local row, col = item_start(bufnr, s, item)
  return shared.ghost_after_cursor(bufnr, shared.item_text(item.insertText), row, col), item
end

local function render(bufnr)
  clear(bufnr)
  local ghost, item = ghost_of(bufnr)
  if not ghost or ghost == '' or not vim.startswith(api.nvim_get_mode().mode, 'i') then
    return false
  end
  local s = state[bufnr]
  local hl = config.options.inline.hl_group
  local lines = vim.split(ghost, '\n', { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    table.insert(virt_lines, { { lines[i], hl } })
  end
  local hint = #s.items > 1 and (' (%d/%d)'):format(s.index, #s.items) or nil
  local first = { { lines[1], hl } }
  if hint then
    table.insert(#virt_lines > 0 and virt_lines[#virt_lines] or first, { hint, 'Comment' })
  end
  local cursor = api.nvim_win_get_cursor(0)
  api.nvim_buf_set_extmark(bufnr, ns, cursor[1] - 1, cursor[2], {
    virt_text = first,
    virt_text_pos = 'inline',
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = 'combine',
  })
  if not s.shown or s.shown ~= item then
    s.shown = item
    shared.notify_server(bufnr, 'dgls/didShowCompletion', { item = item })
  end
  return true
end

local function cancel(bufnr)
  local s = state[bufnr]
  if not s then
    return
  end
  if s.timer then
    s.timer:stop()
  end
  if s.request_id and s.client then
    pcall(require('dgls').cancel_request, s.client, s.request_id)
  end
  s.request_id = nil
end

local function request(bufnr, kind, on_done)
  local s = state[bufnr]
  local client = s and require('dgls').client(bufnr)
  if not client then
    return
  end
  cancel(bufnr)
  local cursor = api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local params = {
    textDocument = vim.lsp.util.make_text_document_params(bufnr),
    position = position.lsp_position(bufnr, row, col, client.offset_encoding),
    context = { triggerKind = kind },
  }
  s.client = client
  local ok, id = require('dgls').request(client, 'textDocument/inlineCompletion', params, function(err, result)
    s.request_id = nil
    if err or api.nvim_buf_get_changedtick(bufnr) ~= tick then
      return
    end
    local items = result and (result.items or result) or {}
    if #items == 0 then
      return
    end
    s.items, s.index, s.row, s.col, s.encoding = items, 1, row, col, client.offset_encoding
    if on_done then
      on_done()
    end
    render(bufnr)
  end, bufnr)
  s.request_id = ok and id or nil
end

--- inline.debounce_ms, else the server's hint (dgls/status debounceMs, from completion.debounceMs).
local function debounce_ms(bufnr)
  local configured = config.options.inline.debounce_ms
  if configured then
    return configured
  end
  local dgls = require('dgls')
  local client = dgls.client(bufnr)
  local status = client and dgls.status[client.id]
  return status and tonumber(status.debounceMs) or 75
end

local function schedule_request(bufnr)
  local s = state[bufnr]
  if not s then
    return
  end
  if s.timer then
    s.timer:stop()
  else
    s.timer = vim.uv.new_timer()
  end
  s.timer:start(debounce_ms(bufnr), 0, vim.schedule_wrap(function()
    if api.nvim_get_current_buf() == bufnr and vim.startswith(api.nvim_get_mode().mode, 'i') then
      request(bufnr, shared.TRIGGER_AUTOMATIC)
    end
  end))
end

function M.attach(_, bufnr)
  if state[bufnr] then
    return
  end
  state[bufnr] = {}
  api.nvim_create_autocmd({ 'TextChangedI', 'InsertEnter' }, {
    group = augroup,
    buffer = bufnr,
    callback = function()
      -- Typed through the suggestion: keep showing what is left, and ask again (the server cache answers).
      if not render(bufnr) then
        local s = state[bufnr]
        s.items = nil
      end
      schedule_request(bufnr)
    end,
  })
  api.nvim_create_autocmd('CursorMovedI', {
    group = augroup,
    buffer = bufnr,
    callback = function()
      if not render(bufnr) then
        clear(bufnr)
      end
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = augroup,
    buffer = bufnr,
    callback = function()
      cancel(bufnr)
      clear(bufnr)
      state[bufnr].items = nil
    end,
  })
  api.nvim_create_autocmd({ 'BufUnload' }, {
    group = augroup,
    buffer = bufnr,
    callback = function()
      cancel(bufnr)
      local s = state[bufnr]
      if s and s.timer then
        s.timer:close()
      end
      state[bufnr] = nil
    end,
  })
end

function M.accept()
  local bufnr = api.nvim_get_current_buf()
  local ghost, item = ghost_of(bufnr)
  if not ghost or ghost == '' then
    return false
  end
  do
    local s = state[bufnr]
    local text = shared.item_text(item.insertText)
    if item.range then
      local start_row, start_col = position.from_lsp(bufnr, item.range.start, s.encoding)
      local end_row, end_col = position.from_lsp(bufnr, item.range['end'], s.encoding)
      local cursor = api.nvim_win_get_cursor(0)
      -- The range was computed before the user typed through part of it: extend it to the cursor.
      if end_row < cursor[1] - 1 or (end_row == cursor[1] - 1 and end_col < cursor[2]) then
        end_row, end_col = cursor[1] - 1, cursor[2]
      end
      local lines = vim.split(text, '\n', { plain = true })
      api.nvim_buf_set_text(bufnr, start_row, start_col, end_row, end_col, lines)
      api.nvim_win_set_cursor(0, { start_row + #lines, (#lines == 1 and start_col or 0) + #lines[#lines] })
    else
      shared.insert_at_cursor(bufnr, ghost)
    end
    cancel(bufnr)
    clear(bufnr)
    s.items = nil
    if item.command then
      local client = require('dgls').client(bufnr)
      if client then
        require('dgls').request(client, 'workspace/executeCommand', item.command, function() end, bufnr)
      end
    end
  end
  return true
end

local function extmarks_partial(take)
  local bufnr = api.nvim_get_current_buf()
  local ghost, item = ghost_of(bufnr)
  if not ghost or ghost == '' then
    return false
  end
  shared.accept_part(bufnr, item, ghost, take)
  render(bufnr)
  return true
end

function M.accept_word()
  return extmarks_partial(shared.take_word)
end

function M.accept_line()
  return extmarks_partial(shared.take_line)
end

local function extmarks_cycle(count)
  local bufnr = api.nvim_get_current_buf()
  local s = state[bufnr]
  if not s then
    return false
  end
  if s.items and #s.items > 1 then
    s.index = (s.index - 1 + count) % #s.items + 1
    render(bufnr)
  else
    -- One candidate so far: ask for several (an invoked request) and move to the next/previous one.
    request(bufnr, shared.TRIGGER_INVOKED, function()
      s.index = (count % #s.items) + 1
    end)
  end
  return true
end

function M.next()
  return extmarks_cycle(1)
end

function M.prev()
  return extmarks_cycle(-1)
end

function M.dismiss()
  local bufnr = api.nvim_get_current_buf()
  local visible = #api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, {}) > 0
  cancel(bufnr)
  clear(bufnr)
  if state[bufnr] then
    state[bufnr].items = nil
  end
  return visible
end

function M.visible()
  return #api.nvim_buf_get_extmarks(api.nvim_get_current_buf(), ns, 0, -1, {}) > 0
end

function M.attached(bufnr)
  return state[bufnr] ~= nil
end

return M
