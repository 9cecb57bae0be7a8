"""The Dataset screen: the preflight table, caption edits (one, the table, or in bulk), tag
counts and auto-captioning as a background job."""

from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.studio import dataset_ops, runs
from sdlora.studio.jobs import JobQueue

HEADERS = ["image", "file", "size", "bucket", "status", "caption"]


def build(queue: JobQueue) -> None:
    import gradio as gr

    with gr.Row():
        folder = gr.Textbox(label="Dataset folder", elem_id="ds-folder", scale=4)
        trigger = gr.Textbox(label="Trigger word", elem_id="ds-trigger", scale=2)
        resolution = gr.Number(label="Resolution", value=512, precision=0, elem_id="ds-res")
        caption_ext = gr.Textbox(label="Caption extension", value=".txt", scale=1)
    scan_button = gr.Button("Check folder", variant="primary", elem_id="ds-scan")
    summary = gr.Markdown(elem_id="ds-summary")
    problems = gr.Markdown(elem_id="ds-problems")
    table = gr.Dataframe(
        headers=HEADERS,
        datatype=["markdown", "str", "str", "str", "str", "str"],
        interactive=True,
        static_columns=[0, 1, 2, 3, 4],
        wrap=True,
        column_widths=["80px", "22%", "9%", "9%", "9%", "auto"],
        elem_id="ds-table",
        label="Files (edit a caption in the table, then Save captions)",
    )
    with gr.Row():
        save_table = gr.Button("Save captions", elem_id="ds-save-table")
    saved = gr.Markdown(elem_id="ds-saved")
    with gr.Accordion("Edit one caption", open=True):
        with gr.Row():
            file = gr.Dropdown(label="File", choices=[], elem_id="ds-file", scale=2)
            caption = gr.Textbox(label="Caption", elem_id="ds-caption", scale=4)
            save_one = gr.Button("Save", elem_id="ds-save-one", scale=1)
    with gr.Accordion("Bulk edit (written at once)", open=False):
        with gr.Row():
            op = gr.Dropdown(dataset_ops.BULK_OPS, value="prefix", label="Edit", elem_id="ds-op")
            text_a = gr.Textbox(label="Text (tag, find, or trigger)", elem_id="ds-a")
            text_b = gr.Textbox(label="Replace with", elem_id="ds-b")
            bulk = gr.Button("Apply to all captions", elem_id="ds-bulk")
    with gr.Accordion("Auto-caption (background job)", open=False):
        with gr.Row():
            template = gr.Textbox(label="Template ({trigger}, {name})", value="{trigger}, {name}")
            overwrite = gr.Checkbox(label="Replace existing captions", value=False)
            auto = gr.Button("Caption images without one", elem_id="ds-autocaption")
        auto_status = gr.Markdown(elem_id="ds-auto-status")
    tags = gr.Dataframe(headers=["tag", "count"], label="Tag frequency", elem_id="ds-tags")
    inputs = [folder, trigger, resolution, caption_ext]
    outputs = [summary, problems, table, file, tags]

    def scan(folder_text, trigger_text, res, ext):
        try:
            result = dataset_ops.preflight(folder_text.strip(), trigger_text, int(res), ext)
        except SdloraError as e:
            return f"**error:** {e}", "", [], gr.update(choices=[]), []
        data = result.report
        head = (
            f"**{data['usable']} usable**, {len(data['skipped'])} skipped, "
            f"{len(data['warnings'])} warnings · buckets: "
            + (", ".join(f"{b} ({n})" for b, n in data["buckets"].items()) or "-")
            + (f" · {data['plan']}" if data["plan"] else "")
        )
        lines = [f"- skipped **{p['file']}**: {p['reason']}" for p in data["skipped"]]
        lines += [f"- warning **{p['file']}**: {p['reason']}" for p in data["warnings"]]
        usable = [row[1] for row in result.rows if not row[4].startswith("skipped")]
        counts = dataset_ops.tag_counts([e.caption for e in result.scan.examples])
        return (
            head,
            "\n".join(lines),
            result.rows,
            gr.update(choices=usable, value=None),
            [list(c) for c in counts],
        )

    scan_button.click(scan, inputs, outputs)
    folder.submit(scan, inputs, outputs)

    def pick(folder_text, ext, name):
        if not name:
            return ""
        return dataset_ops.read_caption(Path(folder_text.strip()), name, ext)

    file.change(pick, [folder, caption_ext, file], caption)

    def select_row(evt: gr.SelectData, rows):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        return gr.update(value=values[row][1]) if row < len(values) else gr.update()

    table.select(select_row, [table], file)

    def done(written, more=""):
        names = ", ".join(p.name for p in written) or "nothing changed"
        return f"<span class='saved'>saved {len(written)} caption file(s)</span>: {names}{more}"

    def write_one(folder_text, ext, name, text, *scan_args):
        try:
            if not name:
                raise SdloraError("pick a file first")
            path = dataset_ops.write_caption(Path(folder_text.strip()), name, text, ext)
        except SdloraError as e:
            return f"**error:** {e}", *([gr.skip()] * 5)
        return done([path]), *scan(*scan_args)

    save_one.click(write_one, [folder, caption_ext, file, caption, *inputs], [saved, *outputs])

    def write_table(folder_text, ext, rows, *scan_args):
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        edits = {row[1]: str(row[5]) for row in values if not str(row[4]).startswith("skipped")}
        try:
            written = dataset_ops.save_captions(Path(folder_text.strip()), edits, ext)
        except SdloraError as e:
            return f"**error:** {e}", *([gr.skip()] * 5)
        return done(written), *scan(*scan_args)

    save_table.click(write_table, [folder, caption_ext, table, *inputs], [saved, *outputs])

    def write_bulk(folder_text, ext, rows, op_name, a, b, *scan_args):
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        current = {row[1]: str(row[5]) for row in values if not str(row[4]).startswith("skipped")}
        try:
            edits = dataset_ops.bulk_edit(current, op_name, a, b)
            written = dataset_ops.save_captions(Path(folder_text.strip()), edits, ext)
        except SdloraError as e:
            return f"**error:** {e}", *([gr.skip()] * 5)
        return done(written), *scan(*scan_args)

    bulk.click(
        write_bulk, [folder, caption_ext, table, op, text_a, text_b, *inputs], [saved, *outputs]
    )

    def caption_job(folder_text, trigger_text, template_text, replace):
        try:
            job = runs.submit_caption(queue, folder_text.strip(), trigger_text, template_text,
                                      replace)  # fmt: skip
        except SdloraError as e:
            return f"**error:** {e}"
        return f"queued as job {job.id}: follow it on the Jobs screen, then Check folder again"

    auto.click(caption_job, [folder, trigger, template, overwrite], auto_status)
