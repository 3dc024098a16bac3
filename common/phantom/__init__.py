"""Synthetic chest CT phantoms with ground truth, a short report and grounded region captions.

``generate_phantom(shape, spacing, seed)`` builds a chest CT in Hounsfield units together with

* ``labels`` (uint8): 0 background, 1 lung parenchyma, 2 heart, 3 blood vessel, 4 airway (lumen),
  5 bone -- the values of :mod:`common.classes`;
* ``lungs`` (uint8): the whole pleural cavity of each lung, intrapulmonary vessels, airways and
  nodules included: 1 right lung, 2 left lung (the lung-segmentation ground truth);
* ``report``: short radiology-report sentences that describe what was generated;
* ``captions``: one dict per visible structure with its class, a text, a voxel bounding box and
  2D boxes on a few axial slices (for cropping patches around each structure).

Geometry and orientation
------------------------
The anatomy is defined analytically in millimetres, so the same seed gives the same patient at
any shape and spacing (only the sampling changes).  Arrays are indexed ``[i, j, k]`` like
nibabel / MONAI ``LoadImage``; the affine is the one a DICOM-derived NIfTI of an axial scan
usually has, ``diag(-sx, -sy, sz)`` in RAS+ world coordinates:

* ``i`` increases towards the patient's **left**   (world x = -sx * i + x0, RAS x > 0 is patient right),
* ``j`` increases towards **posterior**             (world y = -sy * j + y0),
* ``k`` increases towards **superior**              (world z = +sz * k + z0).

The world origin is the centre of the field of view, so displaying ``hu[:, :, k].T`` with the
origin at the top gives the usual radiological view (patient right on the image left, anterior
up).  The generator works slice-major, so the returned arrays are Fortran-ordered ``[i, j, k]``
views (what nibabel writes without a copy).  Bounding boxes are inclusive voxel indices: ``[[i0, j0, k0], [i1, j1, k1]]``; 2D boxes are
``[i0, j0, i1, j1]``.

Image formation: structures are rasterised with analytic partial-volume anti-aliasing, then the
volume is blurred with a Gaussian of standard deviation ``blur_mm`` (mm, per axis) and Gaussian
noise of standard deviation ``noise_hu`` (slightly correlated in-plane) is added; voxels outside
the circular reconstruction field of view are set to -1024 (``fov_circle``).  Everything is
float32 and processed slab by slab, so a 512 x 512 x 133 volume needs a few hundred MB.

Command line::

    python -m common.phantom --out DIR --n 4 --shape 160 160 96 --spacing 2 2 2.5 --seed 0
"""

from common.phantom.builder import generate_phantom
from common.phantom.core import Phantom
from common.phantom.io import main, phantom_paths, render_slice_png, write_phantom

__all__ = ["Phantom", "generate_phantom", "write_phantom", "phantom_paths", "render_slice_png", "main"]
