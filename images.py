"""Opening pictures as upright RGB: what resize.py writes, and what training and sampling read.

Nothing here imports torch: resize.py's processes need only Pillow.
"""
from PIL import Image, ImageOps


def to_rgb(image):
    """Any image Pillow opens -> an upright RGB image (the ResNet wants 3 channels)."""
    image = ImageOps.exif_transpose(image)  # phone photos are stored sideways, with an EXIF 'rotate' tag
    if image.mode.startswith('I'):  # 16-bit grayscale: 0..65535 -> 0..255 (convert would clip it to white)
        image = image.point(lambda v: v / 256).convert('L')
    if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
        # composite on white, as the picture looks on a web page; dropping the alpha
        # channel would show whatever colour the transparent pixels happen to hold
        image = image.convert('RGBA')
        image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image)
    return image.convert('RGB')  # grayscale, palette and CMYK too


def open_rgb(path):
    """Open an image file as upright RGB (what resize.py writes, and what sampling reads)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)
