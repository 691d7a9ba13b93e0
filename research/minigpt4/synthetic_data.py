"""Writing MiniGPT-4's training data layouts (for the tests and the demo): webdataset tar shards
for stage 1 (`KEY.jpg` + `KEY.json` with `caption`, as img2dataset writes LAION and CC/SBU) and a
cc_sbu_align folder for stage 2 (`filter_cap.json` + `image/{image_id}.jpg`) with its prompt file.
"""
import io
import json
import os
import tarfile

from research.common.atomic import atomic_write

# Upstream prompts/alignment.txt.
ALIGNMENT_PROMPTS = ("<Img><ImageHere></Img> Describe this image in detail.",
                     "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
                     "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
                     "<Img><ImageHere></Img> Could you describe the contents of this image for me?")


def jpeg_bytes(image, quality=95):
    """A PIL image as JPEG file bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shard(path, samples):
    """A webdataset tar shard: `samples` is [(key, {suffix: bytes})], written as KEY.suffix in order."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as stream, tarfile.open(fileobj=stream, mode="w") as tar:
        for key, files in samples:
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def caption_sample(key, image, caption):
    """One stage-1 sample (key, {"jpg", "json"}) as img2dataset writes it."""
    return key, {"jpg": jpeg_bytes(image), "json": json.dumps({"caption": caption, "key": key}).encode()}


def write_align(root, rows, prompts=ALIGNMENT_PROMPTS):
    """A cc_sbu_align folder: rows [(image_id, PIL image, caption)] -> image/{id}.jpg and
    filter_cap.json, plus prompts/alignment.txt beside it; returns (data_dir, prompt_path)."""
    os.makedirs(os.path.join(root, "image"), exist_ok=True)
    notes = []
    for image_id, image, caption in rows:
        with atomic_write(os.path.join(root, "image", f"{image_id}.jpg")) as stream:
            stream.write(jpeg_bytes(image))
        notes.append({"image_id": str(image_id), "caption": caption})
    with atomic_write(os.path.join(root, "filter_cap.json"), "w", encoding="utf-8") as stream:
        json.dump({"annotations": notes}, stream)
    prompt_path = os.path.join(os.path.dirname(os.path.abspath(root)), "prompts", "alignment.txt")
    os.makedirs(os.path.dirname(prompt_path), exist_ok=True)
    with atomic_write(prompt_path, "w", encoding="utf-8") as stream:
        stream.write("\n".join(prompts) + "\n")
    return str(root), prompt_path

