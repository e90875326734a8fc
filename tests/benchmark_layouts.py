"""Each benchmark's folder in LLaVA's evaluation layout, small: question files, images and
annotation files in the real formats (what users download per LLaVA's docs/Evaluation.md)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
COLORS = [(220, 30, 30), (30, 60, 220), (20, 160, 40), (230, 200, 20)]


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_image(path: Path, index: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40 + 8 * index, 36), COLORS[index % len(COLORS)]).save(path)
    return path


def textvqa(root: Path) -> Path:
    """4 questions over 3 images (one image asked twice), the OCR line empty once."""
    image_ids = ["003a8ae2ef43b901", "00685bc495504d61", "00685bc495504d61", "0a1b2c3d4e5f6071"]
    asked = [("what is written on the sign?", "stop, sign", ["stop"] * 10),
             ("what brand is it?", "coca, cola", ["coca cola"] * 6 + ["coke"] * 4),
             ("what number is shown?", "", ["7"] * 10),
             ("what color is the car?", "red", ["red"] * 9 + ["dark red"])]
    questions, annotations = [], []
    for number, (image_id, (question, ocr, answers)) in enumerate(zip(image_ids, asked)):
        write_image(root / "train_images" / f"{image_id}.jpg", number)
        questions.append({"question_id": image_id, "image": f"{image_id}.jpg", "category": "default",
                          "text": f"{question}\nReference OCR token: {ocr}{SHORT_ANSWER}"})
        annotations.append({"question": question, "image_id": image_id, "question_id": 34602 + number,
                            "answers": answers, "image_classes": ["Car"], "set_name": "val"})
    write_lines(root / "llava_textvqa_val_v051_ocr.jsonl", questions)
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": annotations}))
    return root


def pope(root: Path) -> Path:
    """Two questions per split (split files from POPE's commit e3e3926, ids from 1)."""
    first_id = {"adversarial": 1, "popular": 10000001, "random": 20000001}
    questions = []
    for split_number, split in enumerate(first_id):
        rows = []
        for i, (thing, label) in enumerate((("dog", "yes"), ("car", "no"))):
            image = f"COCO_val2014_{split_number * 2 + i:012d}.jpg"
            write_image(root / "val2014" / image, split_number * 2 + i)
            rows.append({"question_id": i + 1, "image": image, "text": f"Is there a {thing} in the image?",
                         "label": label})
            questions.append({"question_id": first_id[split] + i, "image": image, "category": split,
                              "text": f"Is there a {thing} in the image?{SHORT_ANSWER}"})
        write_lines(root / "coco" / f"coco_pope_{split}.json", rows)
    write_lines(root / "llava_pope_test.jsonl", questions)
    return root


def mme(root: Path) -> Path:
    """MME/: an existence image (image and answers side by side) and an artwork one (images/ and
    questions_answers_YN/), two questions each."""
    release = root / "MME_Benchmark_release_version"
    cases = [("existence", "000000006040.jpg", release / "existence", release / "existence",
              [("Is there a train in this image?", "Yes"), ("Is there a bed in this image?", "No")]),
             ("artwork", "10002.jpg", release / "artwork" / "images", release / "artwork" / "questions_answers_YN",
              [("Is this artwork created by Matisse?", "No"), ("Is this artwork a painting?", "Yes")])]
    questions = []
    for number, (category, file, images, answers, asked) in enumerate(cases):
        write_image(images / file, number)
        answers.mkdir(parents=True, exist_ok=True)
        stem = Path(file).stem
        (answers / f"{stem}.txt").write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in asked))
        image = str((images / file).relative_to(release))
        questions += [{"question_id": image, "image": image, "category": category, "text": q + SHORT_ANSWER}
                      for q, _ in asked]
    write_lines(root / "llava_mme.jsonl", questions)
    return root


def gqa(root: Path) -> Path:
    """3 balanced questions (2 open, 1 binary) and an unbalanced one LLaVA's file leaves out."""
    asked = {"201307251": ("n161313.jpg", "What is the animal?", "dog", "query"),
             "201640614": ("n161313.jpg", "Is the sky blue?", "yes", "verify"),
             "20968379": ("n235859.jpg", "What color is the car?", "red", "query")}
    questions, annotations = [], {}
    for number, (question_id, (image, question, answer, structural)) in enumerate(asked.items()):
        write_image(root / "data" / "images" / image, number)
        questions.append({"question_id": question_id, "image": image, "category": "default",
                          "text": question + SHORT_ANSWER})
        annotations[question_id] = {"imageId": image[:-4], "question": question, "answer": answer,
                                    "fullAnswer": answer, "isBalanced": True,
                                    "types": {"structural": structural, "semantic": "obj", "detailed": "x"}}
    annotations["999"] = {"imageId": "n1", "question": "?", "answer": "no", "isBalanced": False,
                          "types": {"structural": "logical"}}
    write_lines(root / "llava_gqa_testdev_balanced.jsonl", questions)
    (root / "data" / "testdev_balanced_questions.json").write_text(json.dumps(annotations))
    return root


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]


def mmbench(root: Path) -> Path:
    """Two questions with their circular copies: four options (4 rows), two options and a hint (2 rows)."""
    def png(index: int) -> str:
        out = io.BytesIO()
        Image.new("RGB", (48, 40), COLORS[index]).save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()

    four = ["a cat", "a dog", "red", "blue"]
    rows = [(k * 1000000, "What is shown?", "nan", four[k:] + four[:k], "BADC"[k], "attribute", 0) for k in range(4)]
    rows += [(1, "Is it raining?", "Look at the sky.", ["yes", "no"], "A", "existence", 1),
             (1000001, "Is it raining?", "Look at the sky.", ["no", "yes"], "B", "existence", 1)]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "mmbench_dev_20230712.tsv").open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(MMBENCH_COLUMNS)
        for index, question, hint, choices, answer, category, image in rows:
            cells = [*choices, "nan", "nan"][:4]
            writer.writerow([index, question, hint, *cells, answer, category, png(image), "src", "coarse", "nan",
                             "dev"])
    return root


LAYOUTS = {"textvqa": textvqa, "pope": pope, "mme": mme, "gqa": gqa, "mmbench": mmbench}
