"""Region reads of images larger than memory: each format gives the numbers NumPy slicing of the stored array
gives, a TIFF decodes only the tiles a region touches, and bad files get one line naming the file and the fix."""
import pickle
import sys
import warnings

import numpy as np
import pytest
import tifffile

from segfocal.data import DataError
from segfocal.data.regions import ImageRegion, MaskRegion, blocks, check_chunking, open_region

from large_data import write_array

zarr = pytest.importorskip("zarr")

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (300, 300, 3), dtype=np.uint8)
BANDS = RNG.integers(0, 65536, (300, 300, 4), dtype=np.uint16)
BOX = (37, 211, 5, 290)  # rows 37:211, columns 5:290: partial tiles on every side


def read(region, box=BOX):
    return region.read(*box)


def expected(array, box=BOX):
    part = array[box[0]:box[1], box[2]:box[3]]
    return part if part.ndim == 3 else part[..., None]


@pytest.mark.parametrize("suffix,array", [(".tif", RGB), (".tif", BANDS), (".zarr", BANDS), (".npy", BANDS),
                                          (".tif", BANDS[..., 0]), (".zarr", RGB[..., 0])])
def test_each_format_reads_the_region_numpy_slicing_gives(tmp_path, suffix, array):
    region = open_region(write_array(tmp_path / f"image{suffix}", array), decode=None)
    assert region.shape == (300, 300) and region.dtype == array.dtype
    assert region.channels == (array.shape[2] if array.ndim == 3 else 1)
    np.testing.assert_array_equal(read(region), expected(array))
    # a copy handed to a DataLoader worker (pickled, or forked: another process id) reopens the file
    np.testing.assert_array_equal(read(pickle.loads(pickle.dumps(region))), expected(array))


def test_a_planar_multiband_tiff_and_an_ome_zarr_image_read_as_height_width_channels(tmp_path):
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(BANDS, 2, 0), tile=(64, 64), photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(read(open_region(planar, None)), expected(BANDS))

    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")  # OME-Zarr 0.4: t, c, y, x at level "0"
    level = group.create_array("0", shape=(1, 4, 300, 300), chunks=(1, 4, 64, 64), dtype=np.uint16)
    level[...] = np.moveaxis(BANDS, 2, 0)[None]
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                   "axes": [{"name": "t"}, {"name": "c"}, {"name": "y"}, {"name": "x"}]}]
    region = open_region(tmp_path / "ome.zarr", None)
    assert (region.shape, region.channels, region.chunks) == ((300, 300), 4, (64, 64))
    np.testing.assert_array_equal(read(region), expected(BANDS))


def test_a_tiff_region_decodes_only_the_tiles_it_touches(tmp_path):
    """The tile at the bottom right is corrupt: a region elsewhere reads, the whole image does not."""
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, RGB[..., 0], tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tiff:
        offset, length = tiff.pages[0].dataoffsets[-1], tiff.pages[0].databytecounts[-1]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * length)
    region = open_region(path, None)
    np.testing.assert_array_equal(read(region, (0, 200, 0, 250)), expected(RGB[..., 0], (0, 200, 0, 250)))
    with pytest.raises(DataError, match=r"cannot read rows 0:300, columns 0:300 of .*corrupt.tif"):
        read(region, (0, 300, 0, 300))


def test_other_formats_are_decoded_whole_through_the_given_reader(tmp_path):
    from segfocal.data import read_image

    path = tmp_path / "image.png"
    from PIL import Image
    Image.fromarray(RGB).save(path)
    np.testing.assert_array_equal(read(ImageRegion(path, 3)), expected(RGB))
    grey = tmp_path / "grey.tif"  # 8-bit grey read lazily for a 3-channel model: repeated, as read_image does
    write_array(grey, RGB[..., 0])
    np.testing.assert_array_equal(read(ImageRegion(grey, 3)), read_image(grey, 3)[BOX[0]:BOX[1], BOX[2]:BOX[3]])


def test_an_rgb_mask_goes_through_the_colour_map(tmp_path):
    colours = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    classes = RNG.integers(0, 3, (300, 300)).astype(np.uint8)
    path = write_array(tmp_path / "mask.tif", np.asarray(colours, np.uint8)[classes])
    np.testing.assert_array_equal(read(MaskRegion(path, colours)), classes[BOX[0]:BOX[1], BOX[2]:BOX[3]])
    with pytest.raises(DataError, match="data.color_map"):
        read(MaskRegion(path))


def test_blocks_tile_the_image_once_along_its_chunks(tmp_path):
    region = open_region(write_array(tmp_path / "image.tif", RGB), None)
    covered = np.zeros((300, 300), np.int64)
    for y0, y1, x0, x1 in blocks(region, pixels=20000):
        assert y0 % 64 == 0 and x0 % 64 == 0
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()


# -- bad input -----------------------------------------------------------------------------------

def test_a_missing_zarr_package_names_the_file_and_the_extra(tmp_path, monkeypatch):
    path = write_array(tmp_path / "image.tif", RGB)
    monkeypatch.setitem(sys.modules, "zarr", None)  # import zarr now raises ImportError
    with pytest.raises(DataError) as error:
        open_region(path, None)
    assert str(path) in str(error.value) and 'pip install "segfocal[large]"' in str(error.value)
    assert "\n" not in str(error.value)


def test_a_header_claiming_more_pixels_than_the_limit_is_refused_before_any_read(tmp_path):
    path = write_array(tmp_path / "image.zarr", RGB)
    with pytest.raises(DataError) as error:
        open_region(path, None, max_pixels=300 * 300 - 1)
    assert str(path) in str(error.value) and "300x300 = 90000 pixels" in str(error.value)
    assert "data.patches.max_pixels" in str(error.value)



@pytest.mark.parametrize("layout", [{"tile": (128, 128)}, {"rowsperstrip": 64}])
def test_a_tiff_header_edited_to_claim_a_larger_image_than_its_tiles_hold_is_refused(tmp_path, layout):
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, RGB[:256, :256], **layout)
    assert read(open_region(path, None), (0, 10, 0, 10)).shape == (10, 10, 3)  # as written: read
    with tifffile.TiffFile(path, mode="r+") as tiff:  # 100000 x 100000 pixels claimed, 4 or 5 chunks listed
        tiff.pages[0].tags["ImageWidth"].overwrite(100_000)
        tiff.pages[0].tags["ImageLength"].overwrite(100_000)
    with pytest.raises(DataError, match=r"image.tif: its header gives 100000x100000 pixels, which take \d+ tiles or "
                                        r"strips, but it lists [45]: a corrupt or edited file"):
        read(open_region(path, None), (0, 10, 0, 10))

def test_an_array_that_is_not_an_image_is_refused(tmp_path):
    path = tmp_path / "volume.npy"
    np.save(path, np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(DataError, match=r"volume.npy: expected an \(H, W\) or \(H, W, C\) array"):
        open_region(path, None)


def test_chunks_much_larger_than_the_crop_warn_with_their_shape(tmp_path):
    striped = tmp_path / "striped.tif"
    tifffile.imwrite(striped, RGB, rowsperstrip=300)  # one strip: every crop decodes the whole image
    with pytest.warns(UserWarning, match=r"striped.tif: stored in chunks of 300x300 pixels"):
        check_chunking(open_region(striped, None), (32, 32))
    tiled = open_region(write_array(tmp_path / "tiled.tif", RGB), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_chunking(tiled, (32, 32))
